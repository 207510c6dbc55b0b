"""The errors of the training package that more than one of its modules raises."""

from __future__ import annotations

from lib_ti.errors import TIError


class DataError(TIError, ValueError):
    """The training data or its settings cannot be used."""


class TrainingError(TIError):
    """Training cannot start or continue (the message says why and what was saved)."""
