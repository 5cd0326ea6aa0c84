"""What medlite's command lines print: user errors as one clear line, libraries kept quiet."""

from __future__ import annotations

import logging
import warnings

from rich.console import Console
from rich.markup import escape

from medlite.errors import MedliteError

#: columns when the output is not a terminal: wide enough that no table is squeezed
PIPE_WIDTH = 4000


def make_console(stderr: bool = False) -> Console:
    """The console medlite prints through. In a terminal: rich's own width. Redirected to a
    file or a pipe (CI logs, ``nohup``, SLURM): no wrapping and full-width tables, so a path
    stays on one line and a number is never cut to ``11,171…`` by the 80 columns rich assumes
    (or by a ``COLUMNS`` inherited from the shell that started the job)."""
    console = Console(stderr=stderr)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, width=PIPE_WIDTH, soft_wrap=True)


def quiet_third_party() -> None:
    """Drop library chatter that says nothing about the user's run."""
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)


def print_problem(label: str, message: str, hint: str | None = None) -> None:
    """``medlite: <label>: <message>`` as one red line on stderr, whole (soft wrap), with an
    optional dim hint line below."""
    line = f"[bold red]medlite: {label}[/bold red]: {escape(message)}"
    if hint:
        line += f"\n[dim]{escape(hint)}[/dim]"
    Console(stderr=True, soft_wrap=True).print(line, highlight=False)


def print_error(err: MedliteError) -> None:
    """One red line naming the error type, the message, and how to see the traceback."""
    print_problem(type(err).__name__, str(err), "(add show_traceback=true for the full traceback)")
