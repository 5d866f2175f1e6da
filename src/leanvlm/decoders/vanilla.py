"""`vanilla`: LLaVA-style decoding. Each `<image>` placeholder is replaced by that image's projected vision tokens
(crop by crop, each crop optionally followed by a learned newline embedding) and the whole sequence runs through
every decoder layer with a causal mask. Training-free options make the vision rows skip work in chosen layers
(frozen vision layers, ShortV-style; the redundancy probes): those layers run the skipped parts on the other rows
only, so the skip saves what it claims."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from leanvlm.decoders.attention import CAUSAL, build_mask
from leanvlm.decoders.base import (
    IGNORE_INDEX,
    DecoderInputs,
    DecoderPolicy,
    ImageContext,
    PolicyOptions,
    Preset,
    layer_set,
    positions_from_valid,
)
from leanvlm.decoders.connector import build_connector
from leanvlm.decoders.cost import LayerCost, PrefillShape, causal_pairs
from leanvlm.decoders.layer import Rows, attention_update, layer_forward, project_kv, project_q, project_qkv
from leanvlm.decoders.llm import decoder_layers


def layout_spans(is_text: torch.Tensor, is_image: torch.Tensor, order: list[int], context: ImageContext | None,
                 per_crop_extra: int = 0) -> torch.Tensor:
    """(B, T0) positions each prompt slot takes in vanilla's sequence: one per text token, and for each placeholder
    (its image in `order`, row by row) every crop's tokens plus `per_crop_extra` (a newline)."""
    span = is_text.long()
    if order:
        per_crop = context.tokens.shape[1] + per_crop_extra
        sizes = torch.tensor([context.crops[image] * per_crop for image in order], device=span.device)
        span = span.masked_scatter(is_image, sizes)
    return span


class LightVisionMLP(nn.Module):
    """Probe: replaces attention + FFN of the vision tokens in one layer, RMSNorm(W2 SiLU(W1 Win x) + x) with
    d -> d/4 -> d/4 -> d and no bias."""

    def __init__(self, width: int, norm: nn.Module):
        super().__init__()
        self.input_proj = nn.Linear(width, width // 4, bias=False)
        self.fc1 = nn.Linear(width // 4, width // 4, bias=False)
        self.fc2 = nn.Linear(width // 4, width, bias=False)
        self.norm = norm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(F.silu(self.fc1(self.input_proj(hidden)))) + hidden)


@dataclass
class VanillaOptions(PolicyOptions):
    """`frozen_vision_layers`: decoder layers in which the vision tokens pass through unchanged (no query, attention
    update or FFN) while still giving keys/values to the text (None = none). Redundancy probes (None = off), each from
    the given decoder layer on: vision queries cannot see vision keys; vision tokens take no attention update; vision
    tokens skip the FFN, or with `probe_vision_light_mlp` skip attention and FFN for a trainable d -> d/4 -> d/4 -> d
    MLP (residual + RMSNorm). Skipping attention and FFN from the same layer s is freezing the layers s.. ."""

    frozen_vision_layers: list[int] | None = None
    probe_mask_vision_to_vision_from_layer: int | None = None
    probe_skip_vision_attention_from_layer: int | None = None
    probe_skip_vision_ffn_from_layer: int | None = None
    probe_vision_light_mlp: bool = False

    def resolved(self, num_layers: int) -> VanillaOptions:
        if self.frozen_vision_layers is not None:
            self.frozen_vision_layers = layer_set("frozen_vision_layers", self.frozen_vision_layers, num_layers)
        for name in ("probe_mask_vision_to_vision_from_layer", "probe_skip_vision_attention_from_layer",
                     "probe_skip_vision_ffn_from_layer"):
            layer = getattr(self, name)
            if layer is not None and layer < 0:
                raise ValueError(f"{name} must be a layer index >= 0, got {layer}.")
        if self.probe_vision_light_mlp and self.probe_skip_vision_ffn_from_layer is None:
            raise ValueError("probe_vision_light_mlp replaces attention + FFN of the vision tokens from "
                             "probe_skip_vision_ffn_from_layer on; set that layer too.")
        return self

    def vision_skips(self, num_layers: int) -> tuple[set[int], set[int]]:
        """The layers (of the first `num_layers`) in which the vision rows skip their query, attention update and
        o_proj, and those in which they skip the FFN."""
        def from_layer(start: int | None) -> set[int]:
            return set() if start is None else set(range(start, num_layers))

        frozen = {layer for layer in self.frozen_vision_layers or () if layer < num_layers}
        ffn = frozen | from_layer(self.probe_skip_vision_ffn_from_layer)
        attention = frozen | from_layer(self.probe_skip_vision_attention_from_layer)
        if self.probe_vision_light_mlp:  # the light MLP replaces both
            attention |= from_layer(self.probe_skip_vision_ffn_from_layer)
        return attention, ffn


@dataclass
class VanillaInputs(DecoderInputs):
    """Vanilla's layout of a prefill. With vision tokens and layers in which they skip work, also the rows that keep
    computing there (None otherwise)."""

    text_rows: Rows | None = None  # valid non-vision rows: text and crop newlines
    vision_rows: Rows | None = None  # for the light MLPs of the probe


class VanillaDecoder(DecoderPolicy):
    name = "vanilla"
    Options = VanillaOptions
    options_are = "a vanilla option (frozen vision layers, redundancy probes)"
    groups = ("connector", "image_newline", "probe_light_mlps")
    # Layer sets that exist at any depth (tiny test models have 3 layers). The skipping variants run the skipped
    # parts on the other rows only, so their analytic count is what runs. The vision-to-vision mask is not: the dense
    # attention kernel still computes the masked pairs, which its count leaves out.
    presets: ClassVar[dict[str, Preset]] = {
        "frozen_vision_layers": Preset({"frozen_vision_layers": [0, 2]}),
        "probe_mask_vision_to_vision": Preset({"probe_mask_vision_to_vision_from_layer": 1}, flops_exact=False),
        "probe_skip_vision_attention": Preset({"probe_skip_vision_attention_from_layer": 1}),
        "probe_skip_vision_ffn": Preset({"probe_skip_vision_ffn_from_layer": 1}),
        "probe_light_mlp": Preset({"probe_skip_vision_ffn_from_layer": 1, "probe_vision_light_mlp": True}),
    }

    def __init__(self, config, language_model: nn.Module):
        super().__init__()
        self.feature_layer = config.vision_feature_layer
        self.connector = build_connector(
            config.connector_type,
            config.vision_config.hidden_size,
            config.text_config.hidden_size,
            config.connector_act,
            config.connector_bias,
        )
        width = config.text_config.hidden_size
        # LLaVA-NeXT's init for the newline vector: N(0, 1/d).
        self.image_newline = nn.Parameter(torch.randn(width) * width**-0.5) if config.uses_image_newline else None
        # Frozen vision layers and redundancy probes (vanilla's options; policies built on vanilla leave them off).
        options = VanillaDecoder.options_from(config)
        layers = decoder_layers(language_model)
        self.skip_attention, self.skip_ffn = options.vision_skips(len(layers))
        self.probe_mask_from = options.probe_mask_vision_to_vision_from_layer
        self.light_from = None
        self.light_mlps = None
        if options.probe_vision_light_mlp:
            self.light_from = min(options.probe_skip_vision_ffn_from_layer, len(layers))
            norm_class, eps = type(layers[0].input_layernorm), config.text_config.rms_norm_eps
            self.light_mlps = nn.ModuleList(
                LightVisionMLP(width, norm_class(width, eps=eps)) for _ in range(self.light_from, len(layers))
            )

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"connector": list(self.connector.parameters())}
        if self.image_newline is not None:
            groups["image_newline"] = [self.image_newline]
        if self.light_mlps is not None:
            groups["probe_light_mlps"] = list(self.light_mlps.parameters())
        return groups

    def init_module(self, module: nn.Module) -> None:
        if module is self and self.image_newline is not None:  # LLaVA-NeXT's init for the newline: N(0, 1/d)
            init.normal_(self.image_newline, std=self.image_newline.shape[0] ** -0.5)

    @classmethod
    def prefill_macs(cls, shape: PrefillShape, options: VanillaOptions) -> tuple[dict[str, float], int]:
        cost = LayerCost(shape.llm)
        cls.dense_layers(cost, shape, shape.llm.layers, options)
        cost.add("connector", cls.connector_macs(shape))
        return cost.macs, shape.vision_tokens + shape.text_tokens

    @staticmethod
    def connector_macs(shape: PrefillShape) -> int:
        """mlp2x_gelu: vision width -> d -> d on every vision token."""
        return shape.vision_tokens * (shape.vision_width * shape.llm.hidden + shape.llm.hidden**2)

    @staticmethod
    def dense_layers(cost: LayerCost, shape: PrefillShape, layers: int, options: VanillaOptions) -> None:
        """The first `layers` layers over all n + m tokens: K/V on every row; where the vision rows skip attention,
        q/o and attention on the m other rows only, where they skip the FFN, the FFN on those m rows. The
        vision-to-vision mask's pairs are left out, though the dense kernel computes them."""
        n, m, d = shape.vision_tokens, shape.text_tokens, shape.llm.hidden
        t = n + m
        full = shape.full_attention
        dense_pairs = t * t if full else causal_pairs(t)
        vision_query_pairs = n * t if full else causal_pairs(n)  # vision queries (image first)
        vision_vision_pairs = n * n if full else causal_pairs(n)
        skip_attention, skip_ffn = options.vision_skips(layers)
        mask_from = options.probe_mask_vision_to_vision_from_layer
        light_from = options.probe_skip_vision_ffn_from_layer if options.probe_vision_light_mlp else None
        for index in range(layers):
            rows_q, pairs = (m, dense_pairs - vision_query_pairs) if index in skip_attention else (t, dense_pairs)
            if index not in skip_attention and mask_from is not None and index >= mask_from:
                pairs -= vision_vision_pairs
            if light_from is not None and index >= light_from:
                quarter = d // 4
                cost.add("probe_light_mlps", n * (2 * d * quarter + quarter**2))
            cost.layer(rows_q, t, pairs, m if index in skip_ffn else t)

    def project_images(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        return self.connector(features[self.feature_layer])  # (n_images, N, d)

    def build_inputs(
        self,
        embed: nn.Embedding,
        input_ids: torch.Tensor,
        valid: torch.Tensor,
        image_token_id: int,
        images_per_sample: list[list[int]],
        context: ImageContext | None,
        labels: torch.Tensor | None,
    ) -> DecoderInputs:
        """Every `<image>` placeholder becomes its image's tokens; the laid-out batch is left-padded again.

        Shapes: B samples, T0 prompt slots, T laid-out slots, C crops of N tokens, d width. One scatter into a
        preallocated (B, T, d) buffer: a per-sample loop of slices and concatenations copies the vision tokens twice.
        """
        token_embeds = embed(input_ids)  # (B, T0, d)
        is_image = (input_ids == image_token_id) & valid  # (B, T0): the placeholders
        is_text = valid & ~is_image
        order = [image for images in images_per_sample for image in images]  # the placeholders' images, row by row
        span = layout_spans(is_text, is_image, order, context, per_crop_extra=self.image_newline is not None)
        end = span.cumsum(dim=1)  # (B, T0)
        length = int(end[:, -1].max())
        pad = length - end[:, -1]  # (B,) left padding
        new_valid = torch.arange(length, device=span.device) >= pad[:, None]  # (B, T)
        text_b, text_t = is_text.nonzero(as_tuple=True)  # prompt coordinates of the text tokens
        text_slot = (end - span + pad[:, None])[text_b, text_t]  # their laid-out slots
        inputs_embeds = token_embeds.new_zeros(len(input_ids), length, token_embeds.shape[-1])  # (B, T, d)
        inputs_embeds[text_b, text_slot] = token_embeds[text_b, text_t]
        vision = torch.zeros_like(new_valid)  # (B, T)
        if order:
            rows = [row for image in order for row in context.rows(image)]
            # Every image once and in order (the usual case) needs no copy of the context.
            crops = context.tokens if rows == list(range(len(context.tokens))) else context.tokens[rows]  # (C, N, d)
            image_slots = new_valid.clone()
            image_slots[text_b, text_slot] = False  # (B, T): the images' slots, filled in row-major order
            vision[image_slots] = self._vision_flags(len(rows), context).to(vision.device)
            inputs_embeds[vision] = crops.flatten(0, 1).to(inputs_embeds.dtype)
            if self.image_newline is not None:
                inputs_embeds[image_slots & ~vision] = self.image_newline.to(inputs_embeds.dtype)
        new_labels = None
        if labels is not None:  # (B, T): image slots and padding score nothing
            new_labels = labels.new_full(new_valid.shape, IGNORE_INDEX)
            new_labels[text_b, text_slot] = labels[text_b, text_t]
        crop_counts = None
        if context is not None:
            crop_counts = [[context.crops[image] for image in images] for images in images_per_sample]
        skips = bool(order) and bool(self.skip_attention or self.skip_ffn)
        return VanillaInputs(
            inputs_embeds,
            positions_from_valid(new_valid),
            new_valid,
            new_labels,
            vision_mask=vision,
            image_crops=crop_counts,
            vision_grid=context.grid if context is not None else None,
            text_rows=Rows.where(new_valid & ~vision) if skips else None,
            vision_rows=Rows.where(vision) if skips and self.light_mlps is not None else None,
        )

    def _vision_flags(self, num_crops: int, context: ImageContext) -> torch.Tensor:
        """Per token of `num_crops` crops: True for vision tokens, False for the newlines."""
        per_crop = torch.ones(context.tokens.shape[1] + (self.image_newline is not None), dtype=torch.bool)
        if self.image_newline is not None:
            per_crop[-1] = False
        return per_crop.repeat(num_crops)

    def build_mask(self, key_valid: torch.Tensor, num_queries: int, prefix_len: int, window: int | None):
        """Causal over all tokens (vision and text alike), padding keys hidden."""
        if prefix_len:
            raise ValueError("the vanilla decoder has no prefix keys")
        return build_mask(key_valid, num_queries, window=window)

    # ------------------------------------------------------------------ frozen vision layers and probes
    def layer_step(self, layer_idx, layer, hidden, cos, sin, mask, kv_store, inputs: DecoderInputs):
        """Where the vision rows skip attention and/or FFN, those parts run on the text rows only (gathered per
        sample, scattered back); K/V still come from every row. Vision rows keep their input, or with the light-MLP
        probe get its output. Padding rows are left as they are. Decode steps carry no vision rows: plain layers."""
        if self.probe_mask_from is not None and layer_idx >= self.probe_mask_from and inputs.vision_mask is not None:
            mask = self._mask_vision_to_vision(mask, inputs.vision_mask)
        skip_attention, skip_ffn = layer_idx in self.skip_attention, layer_idx in self.skip_ffn
        text = inputs.text_rows if isinstance(inputs, VanillaInputs) else None
        if text is None or not (skip_attention or skip_ffn):
            return layer_forward(layer, hidden, cos, sin, mask, kv_store, layer_idx)
        normed = layer.input_layernorm(hidden)  # (B, T, d)
        if skip_attention:  # queries from the R text rows: (B, H, R, D); keys/values from all T rows
            key, value = kv_store(layer_idx, *project_kv(layer, normed, cos, sin))
            query = project_q(layer, text.take(normed), text.take(cos), text.take(sin))
            rows = text.take(hidden) + attention_update(layer, query, key, value, text.of_mask(mask, key.shape[2]))
            out = hidden if skip_ffn else text.put(hidden, rows)  # (B, T, d)
        else:
            query, key, value = project_qkv(layer, normed, cos, sin)
            key, value = kv_store(layer_idx, key, value)
            out = hidden + attention_update(layer, query, key, value, mask)
            rows = text.take(out)  # (B, R, d) for the FFN below (this branch means it skips the vision rows)
        if skip_ffn:
            out = text.put(out, rows + layer.mlp(layer.post_attention_layernorm(rows)))
        else:
            out = out + layer.mlp(layer.post_attention_layernorm(out))
        if self.light_mlps is not None and layer_idx >= self.light_from:  # vision rows: the light MLP instead
            vision = inputs.vision_rows
            out = vision.put(out, self.light_mlps[layer_idx - self.light_from](vision.take(hidden)))
        return out

    @staticmethod
    def _mask_vision_to_vision(mask, vision: torch.Tensor) -> torch.Tensor:
        """Hide vision keys from vision queries (self included); a row left empty keeps its own key."""
        batch, length = vision.shape
        if mask is None or isinstance(mask, str):
            dense = torch.ones(length, length, dtype=torch.bool, device=vision.device)
            dense = (dense.tril() if mask == CAUSAL else dense).expand(batch, 1, length, length)
        else:
            dense = mask
        dense = dense & ~(vision[:, None, :, None] & vision[:, None, None, :])
        own = torch.eye(length, dtype=torch.bool, device=vision.device)
        return dense | (own & ~dense.any(dim=-1, keepdim=True))
