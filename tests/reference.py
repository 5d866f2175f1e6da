"""Explicit attention for the reference tests: a Hugging Face decoder layer's own projections, written out step by
step, independent of leanvlm's `attend()` and mask builders."""

import math

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


def attention(layer, q_in, kv_in, q_rope, kv_rope, allowed, prefix_kv=None):
    """Attention of q_in (1, M, d) over kv_in (1, L, d), both already normed, through `layer.self_attn`; returns the
    o_proj output (1, M, d).

    q_rope, kv_rope: (cos, sin) at the query and key positions (q/k norm, when the layer has one, comes before RoPE).
    prefix_kv: (keys, values), each (1, H_kv, P, head_dim), put in front of kv_in's keys and values without RoPE.
    allowed: (M, P + L) bool, True where a query may see a key."""
    attn = layer.self_attn
    hd = attn.head_dim
    q = attn.q_proj(q_in).view(1, q_in.shape[1], -1, hd)
    k = attn.k_proj(kv_in).view(1, kv_in.shape[1], -1, hd)
    v = attn.v_proj(kv_in).view(1, kv_in.shape[1], -1, hd).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, _ = apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), *q_rope)  # (1, H, M, hd)
    k, _ = apply_rotary_pos_emb(k.transpose(1, 2), k.transpose(1, 2), *kv_rope)  # (1, H_kv, L, hd)
    if prefix_kv is not None:
        k, v = torch.cat([prefix_kv[0], k], dim=2), torch.cat([prefix_kv[1], v], dim=2)
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~allowed, float("-inf"))  # (1, H, M, P + L)
    return attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).flatten(2))


def vanilla_layout_start(model, out):
    """What a plain forward over a vanilla-layout batch starts from: (input embeddings (B, T, d), valid (B, T),
    vision (B, T), RoPE (cos, sin) at the valid tokens' positions, causal (T, T) bool with the LLM's sliding window,
    which counts slots: padding is on the left)."""
    from leanvlm.decoders.base import positions_from_valid

    hidden, valid = out.hidden_states[0], out.attention_mask.bool()
    length = hidden.shape[1]
    rope = model.language_model.model.rotary_emb(hidden, positions_from_valid(valid))
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    window = getattr(model.config.text_config, "sliding_window", None)
    if window is not None:
        causal &= (torch.arange(length)[:, None] - torch.arange(length)[None, :]) < window
    return hidden, valid, out.vision_mask, rope, causal
