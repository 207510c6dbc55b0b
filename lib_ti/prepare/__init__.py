"""Prepare: a folder of raw pictures turned into a training folder (sizes, duplicates, captions)."""
