"""`vanilla`: LLaVA-style decoding. Each `<image>` placeholder is replaced by that image's projected vision tokens
(crop by crop, each crop optionally followed by a learned newline embedding) and the whole sequence runs through
every decoder layer with a causal mask."""

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
    positions_from_valid,
)
from leanvlm.decoders.connector import build_connector
from leanvlm.decoders.cost import LayerCost, PrefillShape, causal_pairs
from leanvlm.decoders.layer import attention_update, project_qkv
from leanvlm.decoders.llm import decoder_layers


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
    """Redundancy probes (None = off), each from the given decoder layer on: vision queries cannot see vision keys;
    vision tokens take no attention update; vision tokens skip the FFN, or with `probe_vision_light_mlp` skip
    attention and FFN for a trainable d -> d/4 -> d/4 -> d MLP (residual + RMSNorm)."""

    probe_mask_vision_to_vision_from_layer: int | None = None
    probe_skip_vision_attention_from_layer: int | None = None
    probe_skip_vision_ffn_from_layer: int | None = None
    probe_vision_light_mlp: bool = False

    def resolved(self, num_layers: int) -> VanillaOptions:
        for name in ("probe_mask_vision_to_vision_from_layer", "probe_skip_vision_attention_from_layer",
                     "probe_skip_vision_ffn_from_layer"):
            layer = getattr(self, name)
            if layer is not None and layer < 0:
                raise ValueError(f"{name} must be a layer index >= 0, got {layer}.")
        if self.probe_vision_light_mlp and self.probe_skip_vision_ffn_from_layer is None:
            raise ValueError("probe_vision_light_mlp replaces attention + FFN of the vision tokens from "
                             "probe_skip_vision_ffn_from_layer on; set that layer too.")
        return self


class VanillaDecoder(DecoderPolicy):
    name = "vanilla"
    Options = VanillaOptions
    options_are = "probes of the vanilla decoder"
    groups = ("connector", "image_newline", "probe_light_mlps")
    # Probes from layer 1 exist at any depth. Their analytic count is what skipping the vision rows would save;
    # leanvlm's probes compute those rows and discard them, so counted and measured FLOPs differ on purpose.
    presets: ClassVar[dict[str, Preset]] = {
        "probe_mask_vision_to_vision": Preset({"probe_mask_vision_to_vision_from_layer": 1}, flops_exact=False),
        "probe_skip_vision_attention": Preset({"probe_skip_vision_attention_from_layer": 1}, flops_exact=False),
        "probe_skip_vision_ffn": Preset({"probe_skip_vision_ffn_from_layer": 1}, flops_exact=False),
        "probe_light_mlp": Preset({"probe_skip_vision_ffn_from_layer": 1, "probe_vision_light_mlp": True},
                                  flops_exact=False),
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
        # Redundancy probes (vanilla only; None = off).
        self.probe_mask_from = config.probe_mask_vision_to_vision_from_layer
        self.probe_skip_attention_from = config.probe_skip_vision_attention_from_layer
        self.probe_skip_ffn_from = config.probe_skip_vision_ffn_from_layer
        self.light_mlps = None
        if config.probe_vision_light_mlp:
            layers = decoder_layers(language_model)
            norm_class, eps = type(layers[0].input_layernorm), config.text_config.rms_norm_eps
            self.light_mlps = nn.ModuleList(
                LightVisionMLP(width, norm_class(width, eps=eps))
                for _ in range(min(self.probe_skip_ffn_from, len(layers)), len(layers))
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
    def dense_layers(cost: LayerCost, shape: PrefillShape, layers: int, probes: VanillaOptions) -> None:
        """The first `layers` layers over all n + m tokens, with what the active probes would save."""
        n, m, d = shape.vision_tokens, shape.text_tokens, shape.llm.hidden
        t = n + m
        full = shape.full_attention
        dense_pairs = t * t if full else causal_pairs(t)
        vision_query_pairs = n * t if full else causal_pairs(n)  # vision queries (image first)
        vision_vision_pairs = n * n if full else causal_pairs(n)
        light_from = probes.probe_skip_vision_ffn_from_layer if probes.probe_vision_light_mlp else None

        def active(start: int | None, index: int) -> bool:
            return start is not None and index >= start

        for index in range(layers):
            rows_q, pairs, rows_ffn = t, dense_pairs, t
            if active(probes.probe_skip_vision_attention_from_layer, index) or active(light_from, index):
                rows_q, pairs = m, pairs - vision_query_pairs
            elif active(probes.probe_mask_vision_to_vision_from_layer, index):
                pairs -= vision_vision_pairs
            if active(probes.probe_skip_vision_ffn_from_layer, index):
                rows_ffn = m
            if active(light_from, index):
                quarter = d // 4
                cost.add("probe_light_mlps", n * (2 * d * quarter + quarter**2))
            cost.layer(rows_q, t, pairs, rows_ffn)

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
        span = is_text.long()  # (B, T0): slots each prompt token takes once laid out
        if order:
            per_crop = context.tokens.shape[1] + (self.image_newline is not None)
            sizes = torch.tensor([context.crops[image] * per_crop for image in order], device=span.device)
            span = span.masked_scatter(is_image, sizes)
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
        return DecoderInputs(
            inputs_embeds,
            positions_from_valid(new_valid),
            new_valid,
            new_labels,
            vision_mask=vision,
            image_crops=crop_counts,
            vision_grid=context.grid if context is not None else None,
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

    # ------------------------------------------------------------------ redundancy probes
    def layer_step(self, layer_idx, layer, hidden, cos, sin, mask, kv_store, inputs: DecoderInputs):
        def active(start):
            return start is not None and layer_idx >= start

        vision = inputs.vision_mask
        light = self.light_mlps is not None and active(self.probe_skip_ffn_from)
        probing = [active(self.probe_mask_from), active(self.probe_skip_attention_from),
                   active(self.probe_skip_ffn_from)]
        if vision is None or not any(probing):  # decode steps carry no vision tokens: nothing to probe
            return super().layer_step(layer_idx, layer, hidden, cos, sin, mask, kv_store, inputs)
        if probing[0]:
            mask = self._mask_vision_to_vision(mask, vision)
        query, key, value = project_qkv(layer, layer.input_layernorm(hidden), cos, sin)
        key, value = kv_store(layer_idx, key, value)
        text_rows = (~vision)[..., None].to(hidden.dtype)
        update = attention_update(layer, query, key, value, mask)
        out = hidden + (update * text_rows if probing[1] or light else update)
        update = layer.mlp(layer.post_attention_layernorm(out))
        out = out + (update * text_rows if probing[2] else update)
        if light:  # vision rows: the light MLP instead of attention + FFN
            out = torch.where(vision[..., None], self.light_mlps[layer_idx - self.probe_skip_ffn_from](hidden), out)
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
