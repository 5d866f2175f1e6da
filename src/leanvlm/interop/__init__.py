"""Checkpoints in other projects' layouts: export to Hugging Face Llava, import of the released HiMix code's."""
