"""Textual-inversion embeddings for Stable Diffusion web UIs: formats, tools, training.

Importing this package imports neither gradio nor any web UI module.
"""

from __future__ import annotations

__version__ = "0.1.0"
