"""The shared pieces of every policy's analytic cost: the LLM's shape, one sample's prefill, and a per-layer counter.

Counts are multiply-accumulates (MACs); `leanvlm.measure.flops` turns them into FLOPs (2 x MACs) and adds what the
counting convention decides (lm_head, connector).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LLMShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config) -> LLMShape:
        """From a Hugging Face text config (object or dict); a leanvlm config contributes its text_config."""
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        if get("text_config") is not None:
            return cls.from_config(get("text_config"))
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        return cls(
            hidden=hidden,
            layers=get("num_hidden_layers"),
            heads=heads,
            kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or hidden // heads,
            ffn=get("intermediate_size"),
            vocab=get("vocab_size"),
        )


@dataclass(frozen=True)
class PrefillShape:
    """One sample's prefill: n vision tokens over `crops` crops (images first), m other tokens (text and crop
    newlines); attention counted over the whole query x key rectangle (`full_attention`) or visible pairs only."""

    llm: LLMShape
    vision_width: int
    vision_tokens: int  # n
    text_tokens: int  # m
    crops: int
    full_attention: bool
    vision_heads: int = 1  # the encoder's attention heads (its keys average over them)


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


class LayerCost:
    """MACs by part, accumulated layer by layer."""

    def __init__(self, llm: LLMShape):
        self.llm = llm
        self.macs: dict[str, float] = {"qo": 0, "kv": 0, "attention": 0, "ffn": 0}

    def layer(self, rows_q: int, rows_kv: int, pairs: int, rows_ffn: int | None = None) -> None:
        """One decoder layer: q/o projections of `rows_q` rows, k/v of `rows_kv`, QK^T and AV over `pairs`, and the
        FFN on `rows_ffn` rows (default: the query rows)."""
        d, llm = self.llm.hidden, self.llm
        self.macs["qo"] += rows_q * 2 * d * llm.q_width
        self.macs["kv"] += rows_kv * 2 * d * llm.kv_width
        self.macs["attention"] += 2 * pairs * llm.q_width
        self.macs["ffn"] += (rows_q if rows_ffn is None else rows_ffn) * 3 * d * llm.ffn

    def add(self, part: str, macs: float) -> None:
        self.macs[part] = self.macs.get(part, 0) + macs
