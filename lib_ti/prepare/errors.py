"""The errors of the Prepare view's work."""

from __future__ import annotations

from lib_ti.errors import TIError


class PrepareError(TIError):
    """A Prepare request that cannot run, or a caption edit that cannot be made; the message says why."""


class TaggerError(PrepareError):
    """The tagger cannot run: its runtime cannot be installed or its model files cannot be fetched or read."""
