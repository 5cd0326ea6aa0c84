"""The run directory Hydra makes for a run: what is removed when a run fails before training."""

from __future__ import annotations

import shutil
from pathlib import Path


def remove_failed_start(output_dir: Path, log_dir: Path) -> None:
    """Remove what Hydra wrote for a run that failed before training: nothing half-written stays
    (the run directory and the parents it left empty, up to ``paths.log_dir``)."""
    for name in (".hydra", "train.log"):
        target = output_dir / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists():
            target.unlink()
    log_dir, current = Path(log_dir).resolve(), Path(output_dir).resolve()
    while True:
        try:
            current.rmdir()  # only if empty
        except OSError:
            return
        current = current.parent
        if current == log_dir or log_dir not in current.parents:
            return
