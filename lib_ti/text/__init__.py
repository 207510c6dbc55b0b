"""Text encoding with spliced vectors, prompt chunking, vocabulary and nearest tokens."""
