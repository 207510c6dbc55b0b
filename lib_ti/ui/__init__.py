"""Gradio user interface (3.41 and 4.x). No training or file logic lives here."""
