"""The reproduction table: ours (mean ± std over seeds) beside the published number, the gap, whether
it lies within the source's tolerance, and what it cost; as Markdown, CSV and a plot."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from medlite.atomic import atomic_path, write_text
from medlite.reproduce.recipes import Recipe, published_metrics, source_info
from medlite.reproduce.runner import QUICK_EPOCHS, RunRecord
from medlite.sweeps.aggregate import format_count, format_float, format_pm, mean_std

QUICK_LABEL = f"quick ({QUICK_EPOCHS} epochs per run, not the paper's protocol)"


def metric_label(metric: str, task: dict | None = None) -> str:
    """How tables title a metric: the runs' task record says; the published file names its
    metrics in lower case, which upper case titles when no run finished."""
    from medlite.results import metric_title

    return metric_title(task, metric) if task else metric.upper()


def budget_label(quick: bool, overrides: Sequence[str]) -> str:
    """How the runs were budgeted: the paper's protocol, quick, or changed by overrides."""
    extra = [o for o in overrides if not (quick and o.startswith("trainer.max_epochs="))]
    if not extra:
        return QUICK_LABEL if quick else "the paper's protocol"
    changed = "overrides " + " ".join(extra)
    return f"{QUICK_LABEL}, {changed}" if quick else f"{changed} (not the paper's protocol)"


def _scores(runs: Sequence[RunRecord], metric: str) -> list[float]:
    return [
        float(r.results["test"][metric])
        for r in runs
        if isinstance((r.results.get("test") or {}).get(metric), (int, float))
    ]


def stage_pair(results: dict) -> tuple[dict, dict] | None:
    """A compression run's uncompressed stage (the dense model before the steps, or KD's
    teacher: always the first) and its compressed one (the last)."""
    stages = (results.get("compression") or {}).get("stages") or []
    return (stages[0], stages[-1]) if len(stages) >= 2 else None


def _published_cells(runs: Sequence[RunRecord], recipe: Recipe, tolerance: float) -> dict:
    """Ours (mean ± std over seeds) against each published number: within ± tolerance."""
    cells = {}
    for metric, published in published_metrics(recipe.published()).items():
        mean, std = mean_std(_scores(runs, metric))
        diff = None if mean is None else mean - published
        cells[metric] = {
            "ours": mean,
            "std": std,
            "published": published,
            "diff": diff,
            "within": None if diff is None else abs(diff) <= tolerance + 1e-9,
            "band": (published - tolerance, published + tolerance),
        }
    return cells


def _claim_cells(pairs: Sequence[tuple[dict, dict]], recipe: Recipe, tolerance: float) -> dict:
    """The compressed model against the uncompressed one of the same run: Δ is the mean paired
    difference, and the claim holds when it loses at most ``tolerance`` (a gain always holds)."""
    cells = {}
    for metric in recipe.metrics():
        both = [
            (float(a["test"][metric]), float(b["test"][metric]))
            for a, b in pairs
            if isinstance((a.get("test") or {}).get(metric), (int, float))
            and isinstance((b.get("test") or {}).get(metric), (int, float))
        ]
        mean, std = mean_std([after for _, after in both])
        base, _ = mean_std([before for before, _ in both])
        diff, _ = mean_std([after - before for before, after in both])
        cells[metric] = {
            "ours": mean,
            "std": std,
            "published": base,
            "diff": diff,
            "within": None if diff is None else diff >= -tolerance - 1e-9,
            "band": None if base is None else (base - tolerance, base),
        }
    return cells


def _cost_cut(pairs: Sequence[tuple[dict, dict]]) -> dict:
    """How many times smaller / fewer / faster the compressed model is (mean over seeds).

    Latency compares deployed latencies where both stages have one (a run with export on times
    every stage on its best runtime), so an int8 file is not credited with ONNX Runtime's lead
    over eager PyTorch; otherwise the profiled latencies (``latency_basis`` says which)."""
    effs = [(a.get("efficiency") or {}, b.get("efficiency") or {}) for a, b in pairs]
    deployed = bool(effs) and all(
        a.get("deployed_latency_ms") and b.get("deployed_latency_ms") for a, b in effs
    )
    cut: dict = {"latency_basis": "deployed" if deployed else "profiled"}
    latency = "deployed_latency_ms" if deployed else "latency_ms"
    for key, name in (("size_mb", "size"), ("macs", "macs"), (latency, "latency")):
        ratios = [float(a[key]) / float(b[key]) for a, b in effs if a.get(key) and b.get(key)]
        cut[name], _ = mean_std(ratios)
    return cut


def _first_stage(results: dict) -> str | None:
    stages = (results.get("compression") or {}).get("stages") or []
    return stages[0].get("stage") if stages else None


def _student_alone(kd: RunRecord, records: Sequence[RunRecord]) -> dict | None:
    """The KD student's own baseline: the dense model (first stage, ``before``) of another claim
    run in the same reproduction on the same data, network and seed (e.g. the ptq recipe's
    LiteCNN). A run distilled from scratch has no student-alone row of its own."""
    model = (kd.results.get("model") or {}).get("arch")
    for rec in records:
        if (
            rec is not kd
            and rec.ok
            and rec.recipe.is_claim
            and rec.recipe.dataset == kd.recipe.dataset
            and rec.seed == kd.seed
            and (rec.results.get("model") or {}).get("arch") == model
            and _first_stage(rec.results) == "before"
        ):
            return rec.results["compression"]["stages"][0]
    return None


def _kd_gap(runs: Sequence[RunRecord], records: Sequence[RunRecord], metric: str) -> dict | None:
    """What distillation recovered, over seeds: the teacher, the student alone and the distilled
    student (means over the seeds that have all three), the gap teacher − student alone and the
    share of it KD recovered, (distilled − alone) / gap (ratio of the means; None when the
    teacher is not better than the student alone). None for a run that is not KD from scratch."""
    triples = []
    for r in runs:
        if not r.ok or _first_stage(r.results) != "teacher":
            continue
        teacher, distilled = stage_pair(r.results)
        alone = _student_alone(r, records)
        values = [((s or {}).get("test") or {}).get(metric) for s in (teacher, alone, distilled)]
        if all(isinstance(v, (int, float)) for v in values):
            triples.append([float(v) for v in values])
    if not triples:
        return None
    t, a, d = (mean_std([x[i] for x in triples])[0] for i in range(3))
    gap = t - a
    return {
        "metric": metric,
        "n": len(triples),
        "teacher": t,
        "alone": a,
        "distilled": d,
        "gap": gap,
        "recovered": (d - a) / gap if gap > 0 else None,
    }


def summarise(records: Sequence[RunRecord]) -> list[dict]:
    """One row per recipe (in the order run): seeds, ours vs published (or, for a claim, vs the
    same runs' uncompressed model) per metric, cost."""
    by_recipe: dict[str, list[RunRecord]] = {}
    for rec in records:
        by_recipe.setdefault(rec.recipe.id, []).append(rec)
    rows = []
    for runs in by_recipe.values():
        recipe: Recipe = runs[0].recipe
        entry = recipe.published()
        tolerance = float(source_info(recipe.source).get("tolerance", 0.02))
        ok = [r for r in runs if r.ok]
        errors = [f"seed {r.seed}: {r.error}" for r in runs if not r.ok]
        pairs = []
        if recipe.is_claim:
            for r in ok:
                pair = stage_pair(r.results)
                if pair is None:
                    errors.append(f"seed {r.seed}: the run has no compression stages to compare")
                else:
                    pairs.append(pair)
        row: dict = {
            "recipe": recipe.id,
            "kind": "claim" if recipe.is_claim else "published",
            "source": recipe.source,
            "dataset": recipe.dataset,
            "method": recipe.method_title(),
            "seeds": [r.seed for r in ok],
            "n": len(ok),
            "n_failed": len(runs) - len(ok),
            "reused": sum(r.reused for r in ok),
            "errors": errors,
            "tolerance": tolerance,
            "check": entry.get("check", ""),
            "task": next((r.results["task"] for r in ok if r.results.get("task")), None),
            "cost_cut": _cost_cut(pairs) if recipe.is_claim else None,
            "kd_gap": (
                _kd_gap(ok, records, recipe.metrics()[0])
                if recipe.is_claim and recipe.metrics()
                else None
            ),
        }
        cells = (
            _claim_cells(pairs, recipe, tolerance)
            if recipe.is_claim
            else _published_cells(ok, recipe, tolerance)
        )
        row.update(cells)
        eff = [r.results.get("efficiency") or {} for r in ok]
        for key in ("params", "macs", "latency_ms"):
            row[key], _ = mean_std([float(e[key]) for e in eff if e.get(key) is not None])
        if (row["cost_cut"] or {}).get("latency_basis") == "deployed":  # the compressed stage's
            row["latency_ms"], _ = mean_std(
                [float(b["efficiency"]["deployed_latency_ms"]) for _, b in pairs]
            )
        row["wall_time_s"], _ = mean_std(
            [float(r.results["wall_time_s"]) for r in ok if r.results.get("wall_time_s")]
        )
        rows.append(row)
    return rows


def task_of(rows: Sequence[dict]) -> dict | None:
    """The task record of the first recipe with a finished run (metric titles)."""
    return next((r["task"] for r in rows if r.get("task")), None)


def metrics_of(rows: Sequence[dict]) -> list[str]:
    return list(
        dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, dict) and "ours" in v)
    )


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3f}"


def _verdict(cell: dict) -> str:
    return "–" if cell["within"] is None else ("yes" if cell["within"] else "no")


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


_EMPTY = {"ours": None, "std": None, "published": None, "diff": None, "within": None}


def _table(rows: Sequence[dict], claim: bool) -> list[str]:
    """One Markdown table: published rows, or claim rows (reference = uncompressed model)."""
    metrics, task = metrics_of(rows), task_of(rows)
    head = ["recipe", "n"]
    for m in metrics:
        t = metric_label(m, task)
        head += (
            [f"{t} compressed", f"{t} uncompressed", "Δ", "kept"]
            if claim
            else [f"{t} ours", f"{t} published", "Δ", "within"]
        )
    if claim:
        head += ["size cut", "MACs cut", "latency cut"]
    head += ["params", "MACs", "latency (ms)", "wall time / run"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            f"{r['dataset']} {r['method']}",
            f"{r['n']}" + (f" ({r['n_failed']} failed)" if r["n_failed"] else ""),
        ]
        for m in metrics:
            c = r.get(m) or _EMPTY
            cells += [
                format_pm(c["ours"], c["std"]),
                format_float(c["published"], 3),
                _signed(c["diff"]),
                _verdict(c),
            ]
        if claim:
            cut = r.get("cost_cut") or {}
            cells += [_ratio(cut.get(k)) for k in ("size", "macs", "latency")]
        wall = "–" if r["wall_time_s"] is None else f"{r['wall_time_s'] / 60:.1f} min"
        cells += [
            format_count(r["params"]),
            format_count(r["macs"]),
            format_float(r["latency_ms"], 2),
            wall,
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _kd_table(rows: Sequence[dict]) -> list[str]:
    """Distillation rows: teacher, student alone, distilled student, the gap and its share."""
    task = task_of(rows)
    kd = [r for r in rows if r.get("kd_gap")]
    if not kd:
        return []
    t = metric_label(kd[0]["kd_gap"]["metric"], task)
    out = [
        "",
        f"Distillation (test {t}, means over the seeds with all three runs, n): the teacher, the "
        "student trained alone (the dense model of the group's other recipes, same data and "
        "seed), the distilled student; gap = teacher − student alone; recovered = (distilled − "
        "alone) ÷ gap (– when the teacher is not better than the student alone).",
        "",
        "| recipe | n | teacher | student alone | distilled | gap | recovered |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in kd:
        g = r["kd_gap"]
        share = "–" if g["recovered"] is None else f"{100 * g['recovered']:.0f} %"
        out.append(
            f"| {r['dataset']} {r['method']} | {g['n']} | {g['teacher']:.3f} | "
            f"{g['alone']:.3f} | {g['distilled']:.3f} | {g['gap']:+.3f} | {share} |"
        )
    return out


def markdown(rows: Sequence[dict], title: str, budget: str) -> str:
    task = task_of(rows)
    published = [r for r in rows if r.get("kind") != "claim"]
    claims = [r for r in rows if r.get("kind") == "claim"]
    sources = sorted({r["source"] for r in published})
    claim_sources = sorted({r["source"] for r in claims})
    out = [f"# Reproduction: {title}", "", f"Budget: **{budget}**."]
    if published:
        out += ["", "Ours: test split, mean ± sample std over the seeds that finished (n). "
                "Published: the source's number (medlite/reproduce/published.yaml). Within: "
                "|ours − published| ≤ the source's tolerance. Cost: params, MACs and batch-1 CPU "
                "latency of the trained model, wall time per run on this machine.", ""]  # fmt: skip
        out += _table(published, claim=False)
    if claims:
        out += ["", "Claims: each compression run against its own uncompressed model (the dense "
                "model trained first, or the KD teacher), same data and seed. Compressed: test "
                "split, mean ± sample std over the seeds that finished (n); uncompressed: its "
                "mean; Δ: the mean paired difference; kept: the compressed model lost at most "
                "the tolerance. Cut: uncompressed ÷ compressed size, MACs and batch-1 CPU latency, "
                "mean over seeds; latency is deployed latency (each stage on its fastest runtime: "
                "eager PyTorch or ONNX Runtime, an int8 stage as its int8 file) when the runs "
                "exported, else eager. Params, MACs and latency: the compressed model.", ""]  # fmt: skip
        out += _table(claims, claim=True)
        out += _kd_table(claims)
    out += ["", "## Sources", ""]
    for s in sources:
        info = source_info(s)
        tol = info.get("tolerance")
        out.append(f"- **{s}**: {info.get('citation', '')}, doi {info.get('doi', '–')}; "
                   f"{info.get('table', '')}; {info.get('averaged_over', '')}; tolerance ±{tol}.")  # fmt: skip
        for metric, text in (info.get("metrics") or {}).items():
            out.append(f"  - {metric_label(metric, task)}: {text}")
    for s in claim_sources:
        info = source_info(s)
        out.append(f"- **{s}** (a claim): {info.get('citation', '')}. Claim: "
                   f"{info.get('claim', '')}; reference: {info.get('baseline', '')}; "
                   f"{info.get('averaged_over', '')}; an allowed loss of "
                   f"{info.get('tolerance')}.")  # fmt: skip
        for metric, text in (info.get("metrics") or {}).items():
            out.append(f"  - {metric_label(metric, task)}: {text}")
    if published:
        out += ["", "## How each published number was checked", ""]
        out += [f"- {r['dataset']} {r['method']}: {r['check']}" for r in published]
    failed = [(r["recipe"], e) for r in rows for e in r["errors"]]
    if failed:
        out += ["", "## Failed runs", "", "| recipe | error |", "|---|---|"]
        out += [f"| {rid} | {err.replace('|', '/')} |" for rid, err in failed]
    return "\n".join(out) + "\n"


CSV_FIELDS = ("recipe", "kind", "dataset", "method", "n", "n_failed", "seeds")
#: a distillation row's teacher-student gap (the first metric of its claim)
KD_FIELDS = ("metric", "teacher", "alone", "distilled", "gap", "recovered")


def csv_text(rows: Sequence[dict]) -> str:
    metrics = metrics_of(rows)
    fields = [*CSV_FIELDS]
    for m in metrics:
        fields += [f"{m}_ours", f"{m}_std", f"{m}_published", f"{m}_diff", f"{m}_within"]
    fields += ["size_cut", "macs_cut", "latency_cut"]
    fields += [f"kd_{k}" for k in KD_FIELDS]
    fields += ["params", "macs", "latency_ms", "wall_time_s", "errors"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        flat = {k: r[k] for k in CSV_FIELDS}
        flat["seeds"] = ";".join(str(s) for s in r["seeds"])
        for m in metrics:
            c = r.get(m) or {}
            for key in ("ours", "std", "published", "diff", "within"):
                flat[f"{m}_{key}"] = c.get(key)
        cut = r.get("cost_cut") or {}
        flat.update({f"{k}_cut": cut.get(k) for k in ("size", "macs", "latency")})
        gap = r.get("kd_gap") or {}
        flat.update({f"kd_{k}": gap.get(k) for k in KD_FIELDS})
        flat.update({k: r[k] for k in ("params", "macs", "latency_ms", "wall_time_s")})
        flat["errors"] = " / ".join(r["errors"])
        writer.writerow({k: "" if v is None else v for k, v in flat.items()})
    return buf.getvalue()


def plot(rows: Sequence[dict], path: Path, budget: str) -> Path | None:
    """Ours (mean ± std) beside the published number (or a claim's uncompressed model) and its
    tolerance band, one panel per metric."""
    from matplotlib.figure import Figure

    metrics, task = metrics_of(rows), task_of(rows)
    if not metrics or not rows:
        return None
    fig = Figure(figsize=(4.2 * len(metrics), 1.3 + 0.42 * len(rows)), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    labels = [f"{r['dataset']} {r['method']}" for r in rows]
    ys = list(range(len(rows)))[::-1]
    kinds = {r.get("kind") for r in rows}
    reference = (
        "uncompressed (claim: loses ≤ tolerance)"
        if kinds == {"claim"}
        else "reference ± tolerance"
        if "claim" in kinds
        else "published ± tolerance"
    )
    for ax, m in zip(axes, metrics, strict=True):
        for y, r in zip(ys, rows, strict=True):
            c = r.get(m) or {}
            if c.get("published") is not None:
                ax.plot(list(c["band"]), [y, y], color="0.8", lw=6, solid_capstyle="butt",
                        zorder=1)  # fmt: skip
                ax.plot(c["published"], y, "kx", ms=7, zorder=3,
                        label=reference if y == ys[0] else None)  # fmt: skip
            if c.get("ours") is not None:
                ax.errorbar(c["ours"], y, xerr=c.get("std") or 0, fmt="o", color="tab:blue", capsize=3,
                            zorder=4, label="ours (mean ± std)" if y == ys[0] else None)  # fmt: skip
        ax.set_yticks(ys, labels if ax is axes[0] else [""] * len(ys))
        ax.set_xlabel(f"test {metric_label(m, task)}")
        ax.grid(True, axis="x", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="outside lower center", ncols=2)  # off the data
    fig.suptitle(f"Reproduction ({budget})", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def write(rows: Sequence[dict], out: Path, title: str, budget: str) -> dict[str, Path]:
    """``reproduction.md``, ``.csv`` and ``.png`` in ``out``; their paths."""
    paths = {
        "md": write_text(out / "reproduction.md", markdown(rows, title, budget)),
        "csv": write_text(out / "reproduction.csv", csv_text(rows)),
    }
    png = plot(rows, out / "reproduction.png", budget)
    if png is not None:
        paths["png"] = png
    return paths
