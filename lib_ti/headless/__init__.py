"""Training without a web UI: checkpoint files, queues, torchrun."""

from __future__ import annotations
