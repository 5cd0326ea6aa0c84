"""What medlite's command lines print: user errors as one clear line, libraries kept quiet."""

from __future__ import annotations

import logging
import warnings

from rich.console import Console
from rich.markup import escape

from medlite.errors import MedliteError


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
