"""Which host is running: AUTOMATIC1111 (and its A1111-style forks) or Forge (Forge2 backend)."""

from __future__ import annotations

import importlib.util
from typing import Literal

HostName = Literal["a1111", "forge"]


def host_name() -> HostName:
    """Forge has the ``backend`` and ``modules_forge`` packages and a Forge2 text-processing backend.

    reForge and Forge Classic keep A1111's embedding database and are treated as A1111 here.
    """
    if importlib.util.find_spec("modules_forge") and importlib.util.find_spec("backend.text_processing"):
        return "forge"
    return "a1111"
