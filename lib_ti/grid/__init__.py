"""Comparison grids: embeddings (or one run's snapshots) against checkpoints and CFG scales, rendered
through the host's own txt2img."""
