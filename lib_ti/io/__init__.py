"""Embedding files: formats, safe unpickling, safetensors, embeddings in images, atomic writes, conversion."""
