"""``runtime=auto``: the fastest runtime that passed its parity checks, as measured on this machine.

The evidence is the newest measurement: the last ``scripts/benchmark.py`` (``export/benchmark.json``,
latency at the thread count closest to the one predict will use) or the deployed latency the last
export measured (``export/export.json``), whichever came later; for a run never timed, a rule
(checked int8 ONNX, else fp32 ONNX, else PyTorch). A measured winner whose runtime is not installed here (a run folder copied
to another machine) gives way to the next fastest that is.
"""

from __future__ import annotations

import logging

from medlite.deploy import runtimes
from medlite.deploy.run_dir import TrainedRun
from medlite.results import read_json_object

log = logging.getLogger(__name__)

PYTORCH = runtimes.PYTORCH


def passed_formats(run: TrainedRun) -> set[str]:
    """Formats whose export passed its parity checks (export.json), whose files still exist."""
    formats = read_json_object(run.export_dir / "export.json").get("formats") or {}
    return {
        f
        for f, e in formats.items()
        if f in runtimes.DEPLOYABLE
        and isinstance(e, dict)
        and (e.get("parity") or {}).get("ok")
        and (run.export_dir / runtimes.FORMATS[f].file).is_file()
    }


def _from_benchmark(run: TrainedRun, threads: int) -> tuple[dict[str, float], str]:
    bench = read_json_object(run.export_dir / "benchmark.json")
    rows = [r for r in bench.get("rows") or [] if isinstance(r, dict) and r.get("latency_ms")]
    if not rows:
        return {}, ""
    counts = sorted({int(r["threads"]) for r in rows})
    near = min(counts, key=lambda t: (abs(t - threads), t))
    latency = {
        r.get("format", r.get("runtime")): r["latency_ms"] for r in rows if r["threads"] == near
    }
    return latency, f"benchmark.json, {near} thread(s)"


def _from_export(run: TrainedRun) -> tuple[dict[str, float], str]:
    latency = read_json_object(run.export_dir / "export.json").get("latency") or {}
    if not latency.get("median_ms"):
        return {}, ""
    return dict(latency["median_ms"]), f"export.json, {latency.get('threads')} thread(s)"


def _measured(run: TrainedRun, threads: int) -> tuple[dict[str, float], str]:
    """Latency (ms) per format from the newest measurement (a benchmark, or an export that
    came after it: each times its runtimes in one process, so only one file's numbers are
    compared with each other), and where it came from."""
    found = []
    for name, read in (
        ("benchmark.json", lambda: _from_benchmark(run, threads)),
        ("export.json", lambda: _from_export(run)),
    ):
        path = run.export_dir / name
        if path.is_file():
            latency, source = read()
            if latency:
                found.append((path.stat().st_mtime, latency, source))
    if not found:
        return {}, ""
    _, latency, source = max(found, key=lambda f: f[0])
    return latency, source


def choose_runtime(run: TrainedRun, threads: int) -> tuple[str, str]:
    """``(format, why)``: what ``runtime=auto`` runs for ``run`` at ``threads``."""
    ok = passed_formats(run)
    latency, source = _measured(run, threads)
    ranked = sorted((f for f in latency if f == PYTORCH or f in ok), key=lambda f: latency[f])
    for i, fmt in enumerate(ranked):
        if fmt == PYTORCH or runtimes.installed(fmt):
            why = f"fastest that passed its checks ({latency[fmt]:.3f} ms, {source})"
            if i:
                why += f"; faster {', '.join(ranked[:i])} not installed here"
            return fmt, why
    for fmt in ("onnx_int8", "onnx_fp32"):  # never timed: the rule of thumb
        if fmt in ok:
            return fmt, "not benchmarked yet: the checked ONNX file"
    return PYTORCH, "no exported file passed its checks"
