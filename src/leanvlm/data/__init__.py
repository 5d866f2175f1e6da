"""Data sets: the ShapesVQA generator."""
