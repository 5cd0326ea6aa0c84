"""User-facing errors.

Every problem a user can fix (a bad config value, a missing or corrupt data file, a run that
diverged) raises a subclass of :class:`MedliteError`. ``train.py`` prints these as one clear
message without a traceback; internal bugs still raise ordinary exceptions.
"""

from __future__ import annotations


class MedliteError(Exception):
    """Base class of errors whose message tells the user what to do."""


class ConfigError(MedliteError):
    """A config value or name is invalid (caught before any work starts)."""


class DataError(MedliteError):
    """A data file is missing, corrupt, or does not match its expected format."""


class TrainingError(MedliteError):
    """Training could not go on (e.g. the loss became NaN)."""
