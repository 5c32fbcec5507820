"""Data: sources, prepare (tokenize to token files), loader (training windows)."""
