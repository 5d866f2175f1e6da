"""One decoder layer, from the Hugging Face layer's own submodules, in the pieces policies recombine:
`project_qkv` (normed input -> rotated q, k, v), `attention_update` (attention + o_proj) and the LLM's own MLP.
`layer_forward` is the plain pre-norm layer."""

from __future__ import annotations

import torch
from torch import nn

from leanvlm.decoders.attention import apply_rope, attend


def project_qkv(layer: nn.Module, normed: torch.Tensor, cos, sin, query_from: int = 0):
    """normed (B, T, d) -> query (B, H, T - query_from, D) from rows `query_from:` only, key and value
    (B, H_kv, T, D); q/k get the layer's q/k norms (Qwen3) and RoPE at the angles cos/sin (B, T, D)."""
    attn = layer.self_attn
    batch, length, _ = normed.shape
    key = attn.k_proj(normed).view(batch, length, -1, attn.head_dim)
    value = attn.v_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    query = attn.q_proj(normed[:, query_from:]).view(batch, length - query_from, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before RoPE
        query, key = attn.q_norm(query), attn.k_norm(key)
    key = apply_rope(key.transpose(1, 2), cos, sin)
    query = apply_rope(query.transpose(1, 2), cos[:, query_from:], sin[:, query_from:])
    return query, key, value


def attention_update(layer: nn.Module, query, key, value, mask) -> torch.Tensor:
    """Attention of `query` over key/value, through o_proj: the residual update (B, T, d) of the query tokens."""
    attn = layer.self_attn
    dropout = attn.attention_dropout if layer.training else 0.0
    out = attend(query, key, value, mask, attn.scaling, dropout)
    return attn.o_proj(out.transpose(1, 2).flatten(2))


def layer_forward(layer: nn.Module, hidden, cos, sin, mask, kv_store, layer_idx: int) -> torch.Tensor:
    """One pre-norm decoder layer: the queries are `hidden`'s tokens; the keys/values are whatever `kv_store` returns
    around this layer's new keys (cache, vision prefix)."""
    query, key, value = project_qkv(layer, layer.input_layernorm(hidden), cos, sin)
    key, value = kv_store(layer_idx, key, value)
    hidden = hidden + attention_update(layer, query, key, value, mask)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
