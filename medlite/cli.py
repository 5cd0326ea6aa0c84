"""Turn user-facing errors into one clear message (no traceback) at the command line."""

from __future__ import annotations

import logging
import warnings

from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape

from medlite.errors import MedliteError


def _is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - outside Hydra there is no multirun
        return False


def quiet_third_party() -> None:
    """Drop library chatter that says nothing about the user's run."""
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    # the CSV logger shares the run directory with Hydra's files; it only rewrites metrics.csv
    warnings.filterwarnings(
        "ignore", message=".*Experiment logs directory .* exists and is not empty.*"
    )
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)


def print_error(err: MedliteError) -> None:
    """One red line naming the error type, the message, and how to see the traceback."""
    Console(stderr=True, soft_wrap=True).print(
        f"[bold red]medlite: {type(err).__name__}[/bold red]: {escape(str(err))}\n"
        "[dim](add show_traceback=true for the full traceback)[/dim]",
        highlight=False,
    )


def train(cfg: DictConfig) -> float | None:
    """Entry used by ``train.py``: run the pipeline; print MedliteErrors cleanly unless ``show_traceback``."""
    from medlite.pipeline import run

    quiet_third_party()
    try:
        return run(cfg)
    except MedliteError as err:
        if cfg.get("show_traceback"):
            raise
        print_error(err)
        if _is_multirun():  # one bad job must not stop the others
            return float("nan")
        raise SystemExit(1) from None
