"""Evaluation: batched greedy exact match of a model's answers against LLaVA-format records."""
