"""Turn user-facing errors into one clear message (no traceback) at the command line."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from medlite.config import in_multirun
from medlite.console import print_error, quiet_third_party
from medlite.errors import MedliteError


def _record_failure(cfg: DictConfig, err: BaseException) -> None:
    """Leave a failed job's results.json in its run directory (a job that failed before
    training has none yet), so the sweep summary and aggregation can list it with its error."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from medlite.results import write_json

    out = Path(cfg.paths.output_dir)
    if (out / "results.json").exists():
        return  # the pipeline recorded it (a failure during training)

    def pick(key: str):
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)

    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable config is one way to fail
        config = None
    write_json(
        out / "results.json",
        {
            "status": "failed",
            "error": str(err) if isinstance(err, MedliteError) else f"{type(err).__name__}: {err}",
            "failed_before_training": True,
            "run_dir": str(out),
            "model": {
                "name": pick("model.name"),
                "arch": pick("model.arch"),
                "paradigm": pick("model.paradigm"),
            },
            "compress": {"name": pick("compress.name")},
            "data": {"name": pick("data.name"), "size": pick("data.size")},
            "seed": pick("seed"),
            "config": config,
        },
    )


def train(cfg: DictConfig) -> float | None:
    """Entry used by ``train.py``: run the pipeline; print MedliteErrors cleanly unless
    ``show_traceback``. In a multirun every failure (a bad combination, a NaN, a crash) is
    recorded in the job's results.json and the sweep goes on."""
    from medlite.pipeline import run

    quiet_third_party()
    multirun = in_multirun()
    try:
        return run(cfg)
    except MedliteError as err:
        if cfg.get("show_traceback") and not multirun:
            raise
        print_error(err)
        if multirun:  # one bad job must not stop the others
            _record_failure(cfg, err)
            return float("nan")
        raise SystemExit(1) from None
    except Exception as err:
        if not multirun:
            raise
        logging.getLogger("medlite").exception("job failed; the sweep goes on")
        _record_failure(cfg, err)
        return float("nan")
