"""`vica` (ViCA, arXiv 2602.07574): the vision tokens are projected as vanilla's are but never pass a decoder layer:
no query, no attention update, no FFN. In a chosen set of layers the text attends to them as extra keys/values that
the layer's own k/v projections make from the projected tokens (after the layer's input norm), rotated at the
positions the tokens would hold in vanilla's sequence; the other layers see the text alone. The connector is the only
vision-side weight.

Text positions are vanilla's too, so a prompt reads the same positions under both policies. The vision keys are a
prefix visible to every text query, as HiMix's are: text before an image also sees it, and a sliding window never
hides it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from leanvlm.decoders.base import (
    IGNORE_INDEX,
    DecoderInputs,
    ImageContext,
    PolicyOptions,
    Preset,
    VisionPrefix,
    layer_set,
    left_pad,
)
from leanvlm.decoders.cost import LayerCost, PrefillShape, causal_pairs
from leanvlm.decoders.himix import HiMixMasks
from leanvlm.decoders.layer import layer_forward, project_kv
from leanvlm.decoders.llm import decoder_layers
from leanvlm.decoders.vanilla import VanillaDecoder, layout_spans


@dataclass
class ViCAOptions(PolicyOptions):
    """`vica_layers`: the decoder layers (indices from 0) whose text attends to the vision tokens; None = every
    fourth layer from layer 0."""

    vica_layers: list[int] | None = None

    def resolved(self, num_layers: int) -> ViCAOptions:
        if self.vica_layers is None:
            self.vica_layers = list(range(0, num_layers, 4))
        else:
            self.vica_layers = layer_set("vica_layers", self.vica_layers, num_layers)
        return self


class ViCADecoder(VanillaDecoder):
    name = "vica"
    Options = ViCAOptions
    options_are = "an option of the vica decoder"
    groups = ("connector",)
    # the sequence holds text only (so no crop newlines); the vision tokens are keys in the chosen layers
    keeps_vision_tokens = False
    presets: ClassVar[dict[str, Preset]] = {"one_layer": Preset({"vica_layers": [1]})}

    def __init__(self, config, language_model: nn.Module):
        super().__init__(config, language_model)
        self.vica_layers = list(config.vica_layers)
        # A tuple, so that the LLM's modules are not registered (and saved) a second time under the policy.
        self._language_model = (language_model,)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"connector": list(self.connector.parameters())}

    @classmethod
    def prefill_macs(cls, shape: PrefillShape, options: ViCAOptions) -> tuple[dict[str, float], int]:
        """Text rows in every layer; in the chosen layers they also read n vision keys, which those layers' k/v
        projections make from the n projected tokens."""
        llm, n, m = shape.llm, shape.vision_tokens, shape.text_tokens
        cost = LayerCost(llm)
        text_pairs = m * m if shape.full_attention else causal_pairs(m)
        chosen = set(options.vica_layers)
        for index in range(llm.layers):
            cost.layer(m, m, text_pairs + m * n * (index in chosen))
        # the chosen layers' own k/v projections of the vision tokens, run in the prefill (HiMix's vision K/V run
        # where images are encoded, and are counted apart)
        cost.add("kv", len(chosen) * n * 2 * llm.hidden * llm.kv_width)
        cost.add("connector", cls.connector_macs(shape))
        return cost.macs, m

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
        """The text without its placeholders, at vanilla's positions (each placeholder stands for its image's
        tokens), and the chosen layers' vision keys/values at the positions of those tokens."""
        is_image = valid & (input_ids == image_token_id)
        keep = valid & ~is_image
        order = [image for images in images_per_sample for image in images]
        span = layout_spans(keep, is_image, order, context)  # (B, T0)
        first = span.cumsum(dim=1) - span  # (B, T0): vanilla position of each slot's first token
        rows = range(len(input_ids))
        text_ids, text_valid = left_pad([input_ids[b, keep[b]] for b in rows], 0)
        positions = left_pad([first[b, keep[b]] for b in rows], 0)[0]
        text_labels = None
        if labels is not None:
            text_labels = left_pad([labels[b, keep[b]] for b in rows], IGNORE_INDEX)[0]
        prefix = self._prefix(images_per_sample, context, first, is_image) if order else None
        # generation continues after the last image when a prompt ends with one
        return DecoderInputs(embed(text_ids), positions, text_valid, text_labels, prefix, next_position=span.sum(1))

    def _prefix(self, images_per_sample, context: ImageContext, first: torch.Tensor, is_image) -> VisionPrefix:
        """Each sample's projected vision tokens (its images' crops, in order) with their vanilla positions, padded
        at the end with zero rows, then every chosen layer's keys (rotated) and values of them."""
        tokens, positions = [], []
        for b, images in enumerate(images_per_sample):
            starts = first[b, is_image[b]].tolist()  # one placeholder per image, in order
            rows = [context.image(image).flatten(0, 1) for image in images]  # (crops * N, d) each
            tokens.append(torch.cat(rows) if rows else context.tokens.new_zeros(0, context.tokens.shape[-1]))
            positions.append(torch.cat([start + torch.arange(len(r), device=first.device)
                                        for start, r in zip(starts, rows, strict=True)])
                             if rows else first.new_zeros(0))
        vision = pad_sequence(tokens, batch_first=True)  # (B, P, d)
        vision_positions = pad_sequence(positions, batch_first=True)
        lengths = torch.tensor([len(t) for t in tokens], device=first.device)
        valid = torch.arange(vision.shape[1], device=first.device) < lengths[:, None]
        language_model = self._language_model[0]
        vision = vision.to(language_model.get_input_embeddings().weight.dtype)
        cos, sin = language_model.model.rotary_emb(vision, vision_positions)
        layers = decoder_layers(language_model)
        keys, values = [None] * len(layers), [None] * len(layers)
        for index in self.vica_layers:  # (B, H_kv, P, D) each
            keys[index], values[index] = project_kv(layers[index], layers[index].input_layernorm(vision), cos, sin)
        return VisionPrefix(valid, keys, values)

    def build_mask(self, key_valid: torch.Tensor, num_queries: int, prefix_len: int, window: int | None):
        return HiMixMasks.build(key_valid, num_queries, prefix_len, window, separate=False)

    def layer_step(self, layer_idx, layer, hidden, cos, sin, mask, kv_store, inputs: DecoderInputs):
        sees_vision = mask.prefix_len and layer_idx in self.vica_layers
        return layer_forward(layer, hidden, cos, sin, mask.joint if sees_vision else mask.text, kv_store, layer_idx)
