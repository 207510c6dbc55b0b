"""``python -m lib_ti``: see :mod:`lib_ti.cli`."""

from __future__ import annotations

import sys

from lib_ti.cli import main

sys.exit(main())
