"""The layer runner: drives the Hugging Face LLM's own decoder-layer submodules for any decoder policy."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from leanvlm.decoders.attention import apply_rope, attend
from leanvlm.decoders.base import DecoderInputs, DecoderPolicy
from leanvlm.decoders.cache import KVCache
from leanvlm.llm import decoder_layers, sliding_window


def layer_forward(layer: nn.Module, hidden, cos, sin, mask, kv_store, layer_idx: int) -> torch.Tensor:
    """One pre-norm decoder layer, run from the HF layer's own submodules: the queries are `hidden`'s tokens; the
    keys/values are whatever `kv_store` returns around this layer's new text keys (cache, vision prefix)."""
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    head_shape = (batch, length, -1, attn.head_dim)
    normed = layer.input_layernorm(hidden)
    query = attn.q_proj(normed).view(head_shape)
    key = attn.k_proj(normed).view(head_shape)
    value = attn.v_proj(normed).view(head_shape)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before RoPE
        query, key = attn.q_norm(query), attn.k_norm(key)
    query = apply_rope(query.transpose(1, 2), cos, sin)  # (B, H, T, D)
    key = apply_rope(key.transpose(1, 2), cos, sin)
    key, value = kv_store(layer_idx, key, value.transpose(1, 2))
    dropout = attn.attention_dropout if layer.training else 0.0
    out = attend(query, key, value, mask, attn.scaling, dropout)
    hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def run_decoder(
    language_model: nn.Module,
    policy: DecoderPolicy,
    inputs: DecoderInputs,
    cache: KVCache | None = None,
    gradient_checkpointing: bool = False,
) -> torch.Tensor:
    """Run every decoder layer and the final norm; return hidden states (B, T, d)."""
    hidden = inputs.inputs_embeds
    num_queries = hidden.shape[1]
    cos, sin = language_model.model.rotary_emb(hidden, inputs.position_ids)
    prefix = inputs.prefix
    if prefix is not None:  # the text's dtype and device rule (an image context may come from elsewhere)
        keys, values = prefix.keys.to(hidden), prefix.values.to(hidden)
    if cache is not None:
        if prefix is not None:
            cache.write_prefix(prefix.valid.to(hidden.device), keys, values, upcoming=num_queries)
        cache.begin(inputs.valid)
        key_valid, prefix_len, kv_store = cache.key_valid, cache.prefix_len, cache.update
    elif prefix is not None:
        key_valid = torch.cat([prefix.valid.to(hidden.device), inputs.valid], dim=1)
        prefix_len = prefix.valid.shape[1]

        def kv_store(layer_idx, key, value):
            return torch.cat([keys[layer_idx], key], dim=2), torch.cat([values[layer_idx], value], dim=2)

    else:
        key_valid, prefix_len = inputs.valid, 0

        def kv_store(layer_idx, key, value):
            return key, value

    masks: dict[int | None, object] = {}
    for layer_idx, layer in enumerate(decoder_layers(language_model)):
        window = sliding_window(language_model, layer_idx)
        if window not in masks:
            masks[window] = policy.build_mask(key_valid, num_queries, prefix_len, window)
        args = (layer, hidden, cos, sin, masks[window], kv_store, layer_idx)
        if gradient_checkpointing and cache is None and torch.is_grad_enabled():
            hidden = checkpoint(layer_forward, *args, use_reentrant=False)
        else:
            hidden = layer_forward(*args)
    if cache is not None:
        cache.end(inputs.valid)
    return language_model.model.norm(hidden)
