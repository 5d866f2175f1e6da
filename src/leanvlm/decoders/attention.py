"""The one attention primitive every decoder policy uses, the mask builder behind each policy's mask, and RoPE.

Key layout shared by all policies: a key sequence is `[prefix | text]`. Prefix keys (HiMix's vision keys) carry no
position and are visible to every query; text keys are causal and may be windowed. Queries are always the last
`num_queries` text keys. A mask is boolean, `True` = may attend, shape (B, 1, num_queries, num_keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Returned by the mask builder when the plain causal mask is exact, so SDPA can use its faster `is_causal` path.
CAUSAL = "causal"


def build_mask(
    key_valid: torch.Tensor, num_queries: int, prefix_len: int = 0, window: int | None = None
) -> torch.Tensor | str | None:
    """Boolean attention mask for queries that are the last `num_queries` text keys.

    key_valid: (B, K) bool, False for padding keys. The first `prefix_len` keys are position-free prefix keys.
    window: sliding-window size for text keys (query index - key index < window), None for full attention.
    Returns None when every query may see every key, `CAUSAL` when the plain causal mask is exact.
    """
    num_keys = key_valid.shape[1]
    num_text = num_keys - prefix_len
    window_is_open = window is None or window >= num_text
    if bool(key_valid.all()) and window_is_open:
        if num_queries == 1:
            return None
        if prefix_len == 0 and num_queries == num_keys:
            return CAUSAL

    key_idx = torch.arange(num_keys, device=key_valid.device) - prefix_len  # text index of each key (<0: prefix)
    query_idx = torch.arange(num_text - num_queries, num_text, device=key_valid.device)
    visible = key_idx[None, :] <= query_idx[:, None]  # (T, K) causal
    if not window_is_open:
        visible &= (query_idx[:, None] - key_idx[None, :]) < window
    visible |= key_idx[None, :] < 0  # prefix keys: always visible
    mask = visible[None] & key_valid[:, None, :]  # (B, T, K)
    # A padding query may have no visible key at all; SDPA would return NaN there, so let it see every key.
    # Its output is never used.
    mask |= ~mask.any(dim=-1, keepdim=True)
    return mask[:, None]


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | str | None,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention. query (B, H, T, D); key/value (B, H_kv, K, D) with H a multiple of H_kv;
    mask from `build_mask`.

    Grouped-query attention runs without materialising repeated K/V, except on accelerators with an explicit mask,
    where SDPA would fall back to its slow math kernel for the grouped layout: there repeating K/V is the faster path.
    """
    groups = query.shape[1] // key.shape[1]
    explicit_mask = isinstance(mask, torch.Tensor)
    if groups > 1 and explicit_mask and query.device.type != "cpu":
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        groups = 1
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask if explicit_mask else None,
        dropout_p=dropout,
        is_causal=isinstance(mask, str),
        scale=scale,
        enable_gqa=groups > 1,
    )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the rotary angles cos/sin (B, T, D) that the LLM's own rotary module computed."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin
