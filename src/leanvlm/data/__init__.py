"""Data: the ShapesVQA generator (synthetic), LLaVA-format datasets (llava, templates), the feature cache (features)."""
