"""Command-line flags of the extension (called by the web UI before it parses its arguments)."""

from __future__ import annotations

import argparse


def preload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ti-log-dir",
        type=str,
        default=None,
        help="Textual Inversion tab: folder for training logs and previews (default: in the data folder)",
    )
