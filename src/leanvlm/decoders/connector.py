"""Connectors that map vision-encoder features to the language model's width (vanilla decoder)."""

from __future__ import annotations

from torch import nn
from transformers.activations import ACT2FN


class MLPConnector(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu`: Linear(d_v, d) -> activation -> Linear(d, d). Submodule names match Hugging Face's
    `LlavaMultiModalProjector`, so Llava checkpoints load without renaming inside the connector."""

    def __init__(self, vision_width: int, text_width: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, text_width, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(text_width, text_width, bias=bias)

    def forward(self, features):
        return self.linear_2(self.act(self.linear_1(features)))


class LinearConnector(nn.Module):
    def __init__(self, vision_width: int, text_width: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, text_width, bias=bias)

    def forward(self, features):
        return self.linear_1(features)


def build_connector(kind: str, vision_width: int, text_width: int, act: str, bias: bool) -> nn.Module:
    if kind == "mlp2x_gelu":
        return MLPConnector(vision_width, text_width, act, bias)
    if kind == "linear":
        return LinearConnector(vision_width, text_width, bias)
    raise ValueError(f"Unknown connector type {kind!r}; choose 'mlp2x_gelu' or 'linear'.")
