"""Narration: what a component tells the user about what it is doing (sans-I/O codec)."""
