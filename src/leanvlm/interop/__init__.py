"""Checkpoints in other projects' layouts: export to Hugging Face Llava; import of what the released HiMix and
ProxyV code saves."""
