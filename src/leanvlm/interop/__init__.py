"""Checkpoints in other projects' layouts: export to Hugging Face Llava."""
