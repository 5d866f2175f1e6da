"""leanvlm's own forward of the Hugging Face vision encoders it drives (SigLIP, CLIP, DINOv2): the HF modules and
weights, leanvlm's loop over them.

Owning the loop buys two things the HF forward cannot give without patching transformers:
- only the layers up to the deepest hidden state the model reads run (LLaVA's usual -2 skips the last layer, a
  DINOv2 read at hidden state 8 of 12 skips four), and never the pooling head or the final norm;
- token merging between attention and MLP (ToMe, `leanvlm.tome`), with size-weighted attention.

Other encoders run their own HF forward, whole. Hidden-state indices are those of HF's `output_hidden_states`: 0
is the embeddings (after CLIP's pre-norm), k the output of layer k, negative indices count from the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
    vision_model: nn.Module, pixel_values: torch.Tensor, states: list[int], merge_per_layer: int = 0
) -> dict[int, torch.Tensor]:
    """{hidden-state index: (n, S_k, d)} for the requested `states`, running only the layers they need.

    merge_per_layer: ToMe's r, the tokens merged away in every layer (0 = the plain encoder, bit for bit the HF
    computation). Merging keeps the prefix tokens (CLS) first and unmerged; the patch tokens that remain are
    averages of the patches they absorbed, in no spatial order.
    """
    config = vision_model.config
    if config.model_type not in ENCODER_TYPES:  # any other encoder: its own forward, every layer
        if merge_per_layer:
            raise ValueError(f"Token merging runs in {', '.join(ENCODER_TYPES)} encoders, not "
                             f"{config.model_type}.")
        hidden_states = vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        return {index: hidden_states[index] for index in states}
    layers = layer_modules(vision_model)
    depth = layers_needed(len(layers), states)
    hidden = embed(vision_model, pixel_values)
    sizes = None  # patches per token, once tokens have merged
    outputs = {0: hidden}
    heads = config.num_attention_heads
    for i, layer in enumerate(layers[:depth], start=1):
        hidden, sizes = _layer(block(layer, config.model_type), hidden, heads, sizes, merge_per_layer,
                               config.model_type in CLS_FIRST)
        outputs[i] = hidden
    return {index: outputs[index % (len(layers) + 1)] for index in states}


def _layer(parts: Block, hidden: torch.Tensor, heads: int, sizes: torch.Tensor | None, merge: int, keep_first: bool):
    """x + attention, [merge r tokens], x + MLP; attention logits add log(size) of each key (proportional attention),
    so a merged token counts as the patches it stands for."""
    n, seq, _ = hidden.shape
    normed = parts.norm1(hidden)
    q, k, v = (proj(normed).view(n, seq, heads, -1).transpose(1, 2) for proj in (parts.q, parts.k, parts.v))
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=size_bias(sizes, q.dtype))  # (n, heads, S, D)
    hidden = hidden + parts.scale1(parts.o(attended.transpose(1, 2).reshape(n, seq, -1)))
    if merge:
        hidden, sizes = bipartite_merge(hidden, k.mean(dim=1), sizes, merge, keep_first)
    hidden = hidden + parts.scale2(parts.mlp(parts.norm2(hidden)))
    return hidden, sizes
