"""Robustness under image corruptions: the test split scored at 5 severities of each corruption.

``python scripts/robustness.py run=<run dir>`` (or ``eval.robustness=true`` in training) writes
``robustness/robustness.json``, ``.md`` and ``.png`` into the run directory.
"""

from medlite.robustness.corruptions import CORRUPTIONS, PARAMETERS, SEVERITIES, corrupt, corrupt_all

__all__ = ["CORRUPTIONS", "PARAMETERS", "SEVERITIES", "corrupt", "corrupt_all"]
