"""`himix` (HiMix, arXiv 2501.10318): vision tokens never become queries and never pass the FFN. In every decoder
layer, a layer-specific RMSNorm + K/V projection turns the frozen encoder features into extra keys/values that all
text queries see ("mixture attention"). Text positions count text tokens only; vision keys get no RoPE. With
`himix_layers` only the chosen layers get vision keys; the others run as the plain LLM's layers."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from leanvlm.decoders.attention import attend, build_mask
from leanvlm.decoders.base import (
    IGNORE_INDEX,
    DecoderInputs,
    DecoderPolicy,
    ImageContext,
    PolicyOptions,
    Preset,
    VisionPrefix,
    layer_set,
    left_pad,
    positions_from_valid,
)
from leanvlm.decoders.cost import LayerCost, PrefillShape, causal_pairs
from leanvlm.decoders.layer import layer_forward, project_qkv
from leanvlm.decoders.llm import decoder_layers, kv_layout


class VisionKV(nn.Module):
    """One decoder layer's vision projection: RMSNorm(d_v), then K and V Linear(d_v -> H_kv * head_dim). The LLM's
    own RMSNorm class (every supported family's is weight * x / RMS(x), the RMS in fp32), so that
    `project_vision_kv` can share the normalisation between layers."""

    def __init__(self, norm: nn.Module, vision_width: int, kv_width: int, bias: bool):
        super().__init__()
        self.norm = norm
        self.k_proj = nn.Linear(vision_width, kv_width, bias=bias)
        self.v_proj = nn.Linear(vision_width, kv_width, bias=bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.norm(features)
        return self.k_proj(normed), self.v_proj(normed)


def project_vision_kv(modules: list[VisionKV], features: torch.Tensor) -> torch.Tensor:
    """Every module's K and V of the same features in one matmul: (n, N, d_v) -> (n, N, len(modules), 2, kv width).

    The features are divided by their RMS once (in fp32, as the norm does), each layer's norm weight is folded into
    its K/V weights (w * x then W is x then W * w), and all layers' K/V weights are stacked: one large matmul
    instead of a norm and two small matmuls per layer, the same numbers up to rounding."""
    x, eps = features.float(), modules[0].norm.variance_epsilon
    normalized = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(features.dtype)
    weight = torch.cat([torch.cat([m.k_proj.weight, m.v_proj.weight]) * m.norm.weight for m in modules])
    bias = None
    if modules[0].k_proj.bias is not None:
        bias = torch.cat([torch.cat([m.k_proj.bias, m.v_proj.bias]) for m in modules])
    projected = F.linear(normalized, weight, bias)  # (n, N, G * 2 * kv width)
    return projected.view(*features.shape[:2], len(modules), 2, -1)


def feature_layer_per_decoder_layer(feature_layers: list[int], num_layers: int) -> list[int]:
    """Spread the encoder layers over consecutive, near-equal groups of decoder layers (first group first)."""
    return [feature_layers[i * len(feature_layers) // num_layers] for i in range(num_layers)]


@dataclass
class HiMixOptions(PolicyOptions):
    """`himix_feature_layers`: vision-encoder layers mapped onto consecutive groups of decoder layers (None =
    `vision_feature_layer` for every decoder layer, as in the paper). `himix_zero_init_values`: start every vision V
    projection at zero (a deviation from the paper, whose V starts random like K): the vision keys then add nothing
    but a little attention mass at initialisation, so training starts from nearly the plain LLM instead of one whose
    every layer attends to random values. `himix_separate_vision_softmax`: text queries attend to the vision keys
    with a softmax of their own whose result is added to the text attention's, instead of one softmax over vision and
    text keys together (a deviation from the paper): the vision keys can then never draw attention away from the
    text, and with zero vision values the untrained model is exactly the plain LLM."""

    himix_feature_layers: list[int] | None = None
    himix_zero_init_values: bool = False
    himix_separate_vision_softmax: bool = False
    himix_layers: list[int] | None = None

    def resolved(self, num_layers: int) -> HiMixOptions:
        vision_layers = num_layers
        if self.himix_layers is not None:
            self.himix_layers = layer_set("himix_layers", self.himix_layers, num_layers)
            vision_layers = len(self.himix_layers)
        if self.himix_feature_layers is not None:
            layers = list(self.himix_feature_layers)
            if not layers or not all(isinstance(x, int) for x in layers):
                raise ValueError(f"himix_feature_layers must be a non-empty list of ints, got {layers!r}.")
            if len(layers) > vision_layers:
                raise ValueError(
                    f"himix_feature_layers has {len(layers)} entries but there are only {vision_layers} decoder "
                    "layers with vision keys to map them onto."
                )
        return self


class HiMixDecoder(DecoderPolicy):
    name = "himix"
    Options = HiMixOptions
    options_are = "a himix option"
    groups = ("vision_kv",)
    keeps_vision_tokens = False  # vision keys are a position-free set: no layout, no newline
    vision_takes_positions = False
    presets: ClassVar[dict[str, Preset]] = {
        "two_feature_layers": Preset({"himix_feature_layers": [-2, -1]}),
        "separate_vision_softmax": Preset({"himix_separate_vision_softmax": True}),
        "sparse_layers": Preset({"himix_layers": [1]}),
        "sparse_layers_separate_softmax": Preset({"himix_layers": [0, 2], "himix_separate_vision_softmax": True}),
    }

    @classmethod
    def feature_layers(cls, config) -> list[int]:
        if config.himix_feature_layers is not None:
            return list(config.himix_feature_layers)
        return [config.vision_feature_layer]

    @classmethod
    def prefill_macs(cls, shape: PrefillShape, options: HiMixOptions) -> tuple[dict[str, float], int]:
        """Text rows only; the text queries of every layer with vision keys also read n of them, made by that layer's
        K/V."""
        llm, n, m = shape.llm, shape.vision_tokens, shape.text_tokens
        vision_layers = set(range(llm.layers) if options.himix_layers is None else options.himix_layers)
        cost = LayerCost(llm)
        text_pairs = m * m if shape.full_attention else causal_pairs(m)
        for index in range(llm.layers):
            cost.layer(m, m, text_pairs + m * n * (index in vision_layers))
        cost.add("vision_kv", len(vision_layers) * n * 2 * shape.vision_width * llm.kv_width)
        return cost.macs, m

    def __init__(self, config, language_model: nn.Module):
        super().__init__()
        layers = decoder_layers(language_model)
        self.num_kv_heads, self.head_dim = kv_layout(language_model)
        vision_width = config.vision_config.hidden_size
        attn = layers[0].self_attn
        norm_class = type(layers[0].input_layernorm)  # the LLM's own RMSNorm (weight 1 at init)
        eps = config.text_config.rms_norm_eps
        self.num_layers = len(layers)
        self.vision_layers = list(range(len(layers))) if config.himix_layers is None else list(config.himix_layers)
        # keyed by decoder layer (vision_kv.<layer>.*), so that a checkpoint's weights can only load into the
        # layers they were trained in; with every layer this is the paper's layout
        self.vision_kv = nn.ModuleDict({
            str(layer): VisionKV(
                norm_class(vision_width, eps=eps),
                vision_width,
                self.num_kv_heads * self.head_dim,
                bias=attn.k_proj.bias is not None,
            )
            for layer in self.vision_layers
        })
        self.layer_feature = feature_layer_per_decoder_layer(config.feature_layers, len(self.vision_layers))
        for vision_kv in self.vision_kv.values():
            vision_kv.v_proj.zero_init = config.himix_zero_init_values  # read by the model's weight init
        self.separate_vision_softmax = config.himix_separate_vision_softmax

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"vision_kv": list(self.vision_kv.parameters())}

    def project_images(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """{encoder layer: (n, N, d_v)} -> the vision keys and values of every decoder layer that has them
        (n, len(vision_layers), 2, H_kv, N, D), one matmul per group of decoder layers that read the same encoder
        layer."""
        groups = []
        pairs = zip(self.layer_feature, self.vision_kv.values(), strict=True)
        for feature_layer, group in itertools.groupby(pairs, key=lambda pair: pair[0]):
            kv = project_vision_kv([module for _, module in group], features[feature_layer])  # (n, N, G, 2, kv)
            n, num_tokens, layers = kv.shape[:3]
            kv = kv.view(n, num_tokens, layers, 2, self.num_kv_heads, self.head_dim)
            groups.append(kv.permute(0, 2, 3, 4, 1, 5))  # (n, G, 2, H_kv, N, D)
        return torch.cat(groups, dim=1)

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
        keep = valid & (input_ids != image_token_id)  # the placeholder leaves the text sequence
        text_ids, text_valid = left_pad([input_ids[b, keep[b]] for b in range(len(input_ids))], 0)
        text_labels = None
        if labels is not None:
            text_labels = left_pad([labels[b, keep[b]] for b in range(len(labels))], IGNORE_INDEX)[0]
        prefix = self._prefix(images_per_sample, context) if context is not None and len(context) else None
        return DecoderInputs(embed(text_ids), positions_from_valid(text_valid), text_valid, text_labels, prefix)

    def _prefix(self, images_per_sample: list[list[int]], context: ImageContext) -> VisionPrefix | None:
        """Concatenate each sample's images' crops' keys/values; a text-only sample gets no vision keys at all, and a
        layer without vision keys gets None.

        One gather per layer from a per-layer view: indexing the stacked (crops, layers, ...) tensor layer by layer
        would make autograd materialise a gradient of the whole stack for every layer."""
        tokens = context.tokens  # (n_crops, L, 2, H_kv, N, D)
        n_crops, _, _, num_kv_heads, per_crop, head_dim = tokens.shape
        rows = []  # per sample: the flat (crop, token) rows of its vision keys, in order
        for images in images_per_sample:
            crops = [crop for image in images for crop in context.rows(image)]
            rows.append([crop * per_crop + t for crop in crops for t in range(per_crop)])
        prefix_len, padding = max(len(r) for r in rows), n_crops * per_crop  # the padding row is all zeros
        index = torch.tensor([r + [padding] * (prefix_len - len(r)) for r in rows], device=tokens.device)
        valid = index != padding
        keys, values = [None] * self.num_layers, [None] * self.num_layers
        for layer, layer_tokens in zip(self.vision_layers, tokens.unbind(1), strict=True):  # (n, 2, H_kv, N, D)
            flat = layer_tokens.permute(0, 3, 1, 2, 4).reshape(n_crops * per_crop, 2, num_kv_heads, head_dim)
            flat = torch.cat([flat, flat.new_zeros(1, 2, num_kv_heads, head_dim)])
            gathered = flat[index.flatten()].view(len(rows), prefix_len, 2, num_kv_heads, head_dim)
            keys[layer], values[layer] = gathered.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H_kv, P, D) each
        return VisionPrefix(valid, keys, values)

    def build_mask(self, key_valid: torch.Tensor, num_queries: int, prefix_len: int, window: int | None):
        """Text queries see every valid vision key and the text causally; vision keys are never windowed."""
        if self.separate_vision_softmax or len(self.vision_layers) < self.num_layers:
            return HiMixMasks.build(key_valid, num_queries, prefix_len, window, self.separate_vision_softmax)
        return build_mask(key_valid, num_queries, prefix_len=prefix_len, window=window)

    def layer_step(self, layer_idx, layer, hidden, cos, sin, mask, kv_store, inputs: DecoderInputs):
        if not isinstance(mask, HiMixMasks):
            return super().layer_step(layer_idx, layer, hidden, cos, sin, mask, kv_store, inputs)
        if str(layer_idx) not in self.vision_kv or not mask.prefix_len:  # the layer sees the text keys only
            return layer_forward(layer, hidden, cos, sin, mask.text, kv_store, layer_idx)
        if not mask.separate:
            return layer_forward(layer, hidden, cos, sin, mask.joint, kv_store, layer_idx)
        query, key, value = project_qkv(layer, layer.input_layernorm(hidden), cos, sin)
        key, value = kv_store(layer_idx, key, value)
        attn, prefix = layer.self_attn, mask.prefix_len
        dropout = attn.attention_dropout if layer.training else 0.0
        out = attend(query, key[:, :, prefix:], value[:, :, prefix:], mask.text, attn.scaling, dropout)
        vision = attend(query, key[:, :, :prefix], value[:, :, :prefix], mask.vision, attn.scaling, dropout)
        out = out + vision * mask.has_vision
        hidden = hidden + attn.o_proj(out.transpose(1, 2).flatten(2))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


@dataclass
class HiMixMasks:
    """The masks of a forward whose layers attend differently: the first `prefix_len` keys are the vision keys.
    `text` covers the text keys alone (layers without vision keys; the text softmax of a separate vision softmax);
    `joint` covers [vision | text] in one softmax, or, with a `separate` vision softmax, `vision` covers the vision
    keys (None when all are valid) and `has_vision` (B, 1, 1, 1) zeroes the vision term of samples without any."""

    prefix_len: int
    separate: bool
    text: torch.Tensor | str | None
    joint: torch.Tensor | None = None
    vision: torch.Tensor | None = None
    has_vision: torch.Tensor | None = None

    @classmethod
    def build(cls, key_valid: torch.Tensor, num_queries: int, prefix_len: int, window: int | None,
              separate: bool) -> HiMixMasks:
        text = build_mask(key_valid[:, prefix_len:], num_queries, window=window)
        if not separate:
            joint = build_mask(key_valid, num_queries, prefix_len=prefix_len, window=window)
            return cls(prefix_len, separate, text, joint=joint)
        vision_valid = key_valid[:, :prefix_len]
        has_vision = vision_valid.any(dim=1)
        # A sample without vision keys would get NaN from an empty softmax: let it see the padding, then drop it.
        vision = vision_valid | ~has_vision[:, None]
        return cls(prefix_len, separate, text, vision=None if bool(vision.all()) else vision[:, None, None],
                   has_vision=has_vision[:, None, None, None])
