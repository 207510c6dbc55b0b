"""``python -m lib_ti`` for subprocesses of the tests (torchrun included): the tests' torchvision shim first,
as the CPU torch of the test environments has no torchvision operators (open_clip imports torchvision)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import define_torchvision_ops

define_torchvision_ops()

from lib_ti.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
