"""One decoder layer, from the Hugging Face layer's own submodules, in the pieces policies recombine:
`project_qkv` (normed input -> rotated q, k, v; or `project_q` and `project_kv` apart), `attention_update`
(attention + o_proj) and the LLM's own MLP. `layer_forward` is the plain pre-norm layer; `Rows` picks each sample's
rows out of a batch for the parts that run on some rows only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leanvlm.decoders.attention import apply_rope, attend


def project_q(layer: nn.Module, normed: torch.Tensor, cos, sin) -> torch.Tensor:
    """normed (B, R, d) -> query (B, H, R, D), with the layer's q norm (Qwen3) and RoPE at the angles cos/sin
    (B, R, D) of those rows."""
    attn = layer.self_attn
    query = attn.q_proj(normed).unflatten(-1, (-1, attn.head_dim))  # (B, R, H, D), R may be 0
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before RoPE
        query = attn.q_norm(query)
    return apply_rope(query.transpose(1, 2), cos, sin)


def project_kv(layer: nn.Module, normed: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """normed (B, T, d) -> key and value (B, H_kv, T, D); the key gets the layer's k norm (Qwen3) and RoPE."""
    attn = layer.self_attn
    key = attn.k_proj(normed).unflatten(-1, (-1, attn.head_dim))
    if hasattr(attn, "k_norm"):
        key = attn.k_norm(key)
    value = attn.v_proj(normed).unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)
    return apply_rope(key.transpose(1, 2), cos, sin), value


def project_qkv(layer: nn.Module, normed: torch.Tensor, cos, sin, query_from: int = 0):
    """normed (B, T, d) -> query (B, H, T - query_from, D) from rows `query_from:` only, key and value
    (B, H_kv, T, D), as `project_q` and `project_kv` make them."""
    key, value = project_kv(layer, normed, cos, sin)
    query = project_q(layer, normed[:, query_from:], cos[:, query_from:], sin[:, query_from:])
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


@dataclass
class Rows:
    """Each sample's rows where a (B, T) mask holds, packed to the front of R slots (R: the most any sample has).
    `index` (B, R) says which sequence row a slot holds, `present` (B, R) whether the sample selected it. A sample
    with fewer rows fills its last slots with rows it did not select: real rows, so what is computed there stays
    finite (no empty attention row), and `put` leaves them as they were."""

    index: torch.Tensor
    present: torch.Tensor

    @classmethod
    def where(cls, select: torch.Tensor) -> Rows:
        width = int(select.sum(dim=1).max())
        # a stable sort brings each sample's selected rows to the front, in sequence order
        index = torch.sort((~select).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # (B, R)
        return cls(index, select.gather(1, index))

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, w) -> the rows (B, R, w)."""
        return x.gather(1, self.index[..., None].expand(-1, -1, x.shape[-1]))

    def put(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x (B, T, w) with the present rows replaced by `rows` (B, R, w); a new tensor. A sample's slots hold
        distinct rows, so every row is written at most once."""
        rows = torch.where(self.present[..., None], rows, self.take(x))
        return x.scatter(1, self.index[..., None].expand(-1, -1, x.shape[-1]), rows)

    def of_mask(self, mask, num_keys: int):
        """The rows of an attention mask for these rows as queries: (B, 1, R, num_keys), or None (every key)."""
        if mask is None:
            return None
        if isinstance(mask, str):  # CAUSAL: queries and keys are the same rows, all valid: row t sees keys 0..t
            visible = torch.arange(num_keys, device=self.index.device) <= self.index[..., None]  # (B, R, K)
            return visible[:, None]
        return mask.gather(2, self.index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[-1]))
