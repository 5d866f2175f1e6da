"""leanvlm's own forward of the Hugging Face vision encoders it drives (SigLIP, CLIP, DINOv2): the HF modules and
weights, leanvlm's loop over them.

Owning the loop buys what the HF forward cannot give without patching transformers:
- only the layers up to the deepest hidden state the model reads run (LLaVA's usual -2 skips the last layer, a
  DINOv2 read at hidden state 8 of 12 skips four), and never the pooling head or the final norm;
- token merging between attention and MLP (ToMe, `leanvlm.tome`), with size-weighted attention;
- a layer's attention summary (`leanvlm.decoders.base.attention_key`) next to its hidden state, for selection by
  encoder attention (VisionZip), while every layer keeps running on SDPA.

Other encoders run their own HF forward, whole. Hidden-state indices are those of HF's `output_hidden_states`: 0
is the embeddings (after CLIP's pre-norm), k the output of layer k, negative indices count from the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanvlm.decoders.base import attention_key
from leanvlm.tome import bipartite_merge, size_bias

ENCODER_TYPES = ("siglip_vision_model", "clip_vision_model", "dinov2")
# Encoders whose first token is a CLS token, which ToMe never merges.
CLS_FIRST = ("clip_vision_model", "dinov2")


@dataclass(frozen=True)
class Block:
    """One encoder layer's submodules, named alike for every encoder family (layer scales are identity where the
    family has none)."""

    norm1: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    scale1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    scale2: nn.Module


def split_feature_keys(keys) -> tuple[list[int], list[int]]:
    """Feature keys (hidden-state ints and `attention_key`s) -> (hidden-state indices, summarised indices)."""
    prefix = attention_key(0)[:-1]
    states, summaries = [], []
    for key in keys:
        if isinstance(key, int):
            states.append(key)
        elif isinstance(key, str) and key.startswith(prefix):
            summaries.append(int(key[len(prefix):]))
        else:
            raise ValueError(f"Feature key {key!r}: a key is a hidden-state index (int) or attention_key(index).")
    return states, summaries


def check_summaries(model_type: str, num_layers: int, summaries, merge_per_layer: int) -> None:
    """Refuse attention summaries (hidden-state indices) that this encoder cannot give: its type runs its own HF
    forward, a summary of the embeddings (index 0, which no attention layer outputs), or merged tokens."""
    if not summaries:
        return
    if model_type not in ENCODER_TYPES:
        raise ValueError(f"Attention summaries run in {', '.join(ENCODER_TYPES)} encoders, not {model_type}.")
    if any(index % (num_layers + 1) == 0 for index in summaries):
        raise ValueError("An attention summary needs a hidden state that an encoder layer outputs (index 1 or more, "
                         "or negative), not the embeddings (0).")
    if merge_per_layer:
        raise ValueError("An attention summary describes the tokens a layer reads, which token merging changes; use "
                         "tome_r=0 with it.")


def summarised_layers(num_layers: int, summaries) -> set[int]:
    """The layers (as the hidden-state index each outputs, 1..num_layers) whose attention summary is computed for
    the requested summaries, negative indices counted from the end: each layer once, however often it is named."""
    return {index % (num_layers + 1) for index in summaries}


def attention_summary(q: torch.Tensor, k: torch.Tensor, cls_first: bool) -> torch.Tensor:
    """q, k (n, heads, S, D) of one layer -> its attention summary (n, S, 1 + D) (see `attention_key`), in fp32."""
    q, k = q.float(), k.float()
    queries = q[:, :, :1] if cls_first else q  # the CLS row alone, or every query
    probs = torch.softmax(queries @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # (n, heads, 1 or S, S)
    received = probs.mean(dim=(1, 2))  # (n, S)
    return torch.cat([received[..., None], k.mean(dim=1)], dim=-1)


def layer_modules(vision_model: nn.Module) -> nn.ModuleList:
    encoder = vision_model.encoder
    return encoder.layer if vision_model.config.model_type == "dinov2" else encoder.layers


def block(layer: nn.Module, model_type: str) -> Block:
    if model_type == "dinov2":
        attention = layer.attention
        return Block(layer.norm1, attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                     layer.layer_scale1, layer.norm2, layer.mlp, layer.layer_scale2)
    attention = layer.self_attn
    return Block(layer.layer_norm1, attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj,
                 nn.Identity(), layer.layer_norm2, layer.mlp, nn.Identity())


def embed(vision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Hidden state 0: patch + position embeddings (and CLS), after CLIP's pre-norm. (n, S, d)"""
    hidden = vision_model.embeddings(pixel_values)
    if vision_model.config.model_type == "clip_vision_model":
        hidden = vision_model.pre_layrnorm(hidden)
    return hidden


def layers_needed(num_layers: int, feature_layers: list[int]) -> int:
    """Encoder layers to run for the deepest of `feature_layers`, hidden-state indices as in HF
    `output_hidden_states` (0: the embeddings, k >= 0: after k layers, negative: from the end, -1: after the last
    layer), of an encoder with `num_layers` layers."""
    states = num_layers + 1
    wrong = [layer for layer in feature_layers if not -states <= layer < states]
    if not feature_layers or wrong:
        raise ValueError(f"Feature layers {list(feature_layers)}: give at least one hidden-state index of this "
                         f"{num_layers}-layer encoder, from {-states} to {num_layers}.")
    return max(layer % states for layer in feature_layers)


def run_encoder(
    vision_model: nn.Module, pixel_values: torch.Tensor, states: list[int], merge_per_layer: int = 0,
    summaries: list[int] = (),
) -> dict:
    """{hidden-state index: (n, S_k, d)} for the requested `states`, and {attention_key(index): summary} for the
    hidden states in `summaries` (index >= 1: the layer that outputs it), running only the layers they need.

    merge_per_layer: ToMe's r, the tokens merged away in every layer (0 = the plain encoder, bit for bit the HF
    computation). Merging keeps the prefix tokens (CLS) first and unmerged; the patch tokens that remain are
    averages of the patches they absorbed, in no spatial order.
    """
    config = vision_model.config
    if config.model_type not in ENCODER_TYPES:  # any other encoder: its own forward, every layer
        if merge_per_layer:
            raise ValueError(f"Token merging runs in {', '.join(ENCODER_TYPES)} encoders, not "
                             f"{config.model_type}.")
        check_summaries(config.model_type, config.num_hidden_layers, summaries, merge_per_layer)
        hidden_states = vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        return {index: hidden_states[index] for index in states}
    layers = layer_modules(vision_model)
    depth = layers_needed(len(layers), [*states, *summaries])
    check_summaries(config.model_type, len(layers), summaries, merge_per_layer)
    states_count = len(layers) + 1
    summarised = summarised_layers(len(layers), summaries)
    hidden = embed(vision_model, pixel_values)
    sizes = None  # patches per token, once tokens have merged
    outputs = {0: hidden}
    heads = config.num_attention_heads
    for i, layer in enumerate(layers[:depth], start=1):
        hidden, sizes, summary = _layer(block(layer, config.model_type), hidden, heads, sizes, merge_per_layer,
                                        config.model_type in CLS_FIRST, summarise=i in summarised)
        outputs[i] = hidden
        if summary is not None:
            outputs[attention_key(i)] = summary
    return {**{index: outputs[index % states_count] for index in states},
            **{attention_key(index): outputs[attention_key(index % states_count)] for index in summaries}}


def _layer(parts: Block, hidden: torch.Tensor, heads: int, sizes: torch.Tensor | None, merge: int, cls_first: bool,
           summarise: bool = False):
    """x + attention, [merge r tokens], x + MLP; attention logits add log(size) of each key (proportional attention),
    so a merged token counts as the patches it stands for. Returns the new hidden states and sizes, and the layer's
    attention summary when asked (None otherwise)."""
    n, seq, _ = hidden.shape
    normed = parts.norm1(hidden)
    q, k, v = (proj(normed).view(n, seq, heads, -1).transpose(1, 2) for proj in (parts.q, parts.k, parts.v))
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=size_bias(sizes, q.dtype))  # (n, heads, S, D)
    summary = attention_summary(q, k, cls_first).to(hidden.dtype) if summarise else None
    hidden = hidden + parts.scale1(parts.o(attended.transpose(1, 2).reshape(n, seq, -1)))
    if merge:
        hidden, sizes = bipartite_merge(hidden, k.mean(dim=1), sizes, merge, cls_first)
    hidden = hidden + parts.scale2(parts.mlp(parts.norm2(hidden)))
    return hidden, sizes, summary
