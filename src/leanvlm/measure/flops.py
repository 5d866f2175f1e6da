"""Analytic cost model of the language decoder under each policy: prefill FLOPs and per-token decode FLOPs, with a
breakdown by part. FLOPs = 2 x multiply-accumulates; norms, RoPE, softmax and activations are not counted (they are
a few percent and no paper counts them).

Counting conventions are explicit (`Convention`); the papers' own are presets:
- "himix-paper": attention as a full rectangle, lm_head on every position, no connector (HiMix Table, N=728, M=64).
- "proxyv-paper": attention as a full rectangle, no lm_head, no connector (ProxyV, 2880 vision + 55 other tokens).
- "prefill" (default): what an efficient prefill computes: causal attention pairs, lm_head on the last position only,
  connector counted.
Token layout assumed for causal counts: the image(s) come before the text, and crop newlines are counted as text
after all crops (the exact masks differ by a few percent of the attention term). Vanilla's frozen vision layers and
skipping probes count what runs: q/o, attention and FFN on the other rows only where the vision rows skip them
(ProxyV's Table 1 keeps o counted for its attention-skip probe), K/V on every row. The vision-to-vision mask's count
leaves out the pairs it hides, which the attention kernel still computes.

`encoder_flops` counts the vision encoder's forward the same way (attention as the full rectangle: it is
bidirectional), optionally with ToMe token merging, so that `leanvlm flops` can show end-to-end cost: once the decoder
is HiMix, the encoder is most of it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from leanvlm.decoders import BASELINE, DECODERS, all_option_names, check_decoder_name, option_names
from leanvlm.decoders.cost import LLMShape, PrefillShape
from leanvlm.encoder import CLS_FIRST, ENCODER_TYPES


@dataclass(frozen=True)
class VisionShape:
    tokens: int  # per image (one crop)
    width: int
    heads: int = 1  # attention heads (what VisionZip's key matching costs depends on: width / heads per key)


LLM_PRESETS = {
    "smollm2-135m": LLMShape(576, 30, 9, 3, 64, 1536, 49152),
    "qwen2-0.5b": LLMShape(896, 24, 14, 2, 64, 4864, 151936),
    "tinyllama-1.1b": LLMShape(2048, 22, 32, 4, 64, 5632, 32000),
    "llama-3.2-1b": LLMShape(2048, 16, 32, 8, 64, 8192, 128256),
    "llama-3.2-3b": LLMShape(3072, 28, 24, 8, 128, 8192, 128256),
    "phi3-mini": LLMShape(3072, 32, 32, 32, 96, 8192, 32064),
    "vicuna-7b": LLMShape(4096, 32, 32, 32, 128, 11008, 32000),
    "vicuna-13b": LLMShape(5120, 40, 40, 40, 128, 13824, 32000),
    "llama3-8b": LLMShape(4096, 32, 32, 8, 128, 14336, 128256),
    "qwen2-7b": LLMShape(3584, 28, 28, 4, 128, 18944, 152064),
}
# The family `leanvlm bench` builds a random-weight model of each preset as; the others have Llama's layer layout.
LLM_PRESET_FAMILIES = {"qwen2-0.5b": "qwen2", "qwen2-7b": "qwen2"}
# Vision encoders as Hugging Face config fields (full depth); `leanvlm bench` builds random-weight encoders from them.
VISION_CONFIGS = {
    "siglip-so400m-384": ("siglip_vision_model", dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                      num_attention_heads=16, image_size=384, patch_size=14)),
    "clip-l-336": ("clip_vision_model", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                             num_attention_heads=16, image_size=336, patch_size=14)),
    # DINOv2's MLP width is hidden_size x mlp_ratio (its config has no intermediate_size)
    "dinov2-s14-224": ("dinov2", dict(hidden_size=384, mlp_ratio=4, num_hidden_layers=12,
                                      num_attention_heads=6, image_size=224, patch_size=14)),
}
VISION_PRESETS = {  # patch tokens per image (CLS dropped), width and heads
    name: VisionShape((fields["image_size"] // fields["patch_size"]) ** 2, fields["hidden_size"],
                      fields["num_attention_heads"])
    for name, (_, fields) in VISION_CONFIGS.items()
}


@dataclass(frozen=True)
class Convention:
    attention: str = "causal"  # "causal": visible query-key pairs only; "full": the whole rectangle
    lm_head: str = "last"  # "all" positions, "last" position, or "none"
    connector: bool = True  # count the vanilla/proxyv connector (mlp2x_gelu)


CONVENTIONS = {
    "prefill": Convention(),
    "himix-paper": Convention(attention="full", lm_head="all", connector=False),
    "proxyv-paper": Convention(attention="full", lm_head="none", connector=False),
}


def resolve_llm(name_or_path) -> LLMShape:
    if isinstance(name_or_path, LLMShape):
        return name_or_path
    if name_or_path in LLM_PRESETS:
        return LLM_PRESETS[name_or_path]
    if os.path.isfile(str(name_or_path)):
        with open(name_or_path) as f:
            config = json.load(f)
        try:
            return LLMShape.from_config(config)
        except (TypeError, KeyError, ZeroDivisionError):  # a missing field fails in the shape arithmetic
            raise ValueError(
                f"{name_or_path}: a config.json needs hidden_size, num_hidden_layers, num_attention_heads, "
                "intermediate_size and vocab_size."
            ) from None
    raise ValueError(
        f"Unknown LLM {name_or_path!r}: use a preset ({', '.join(LLM_PRESETS)}) or a Hugging Face config.json path."
    )


def resolve_vision(name) -> VisionShape:
    if isinstance(name, VisionShape):
        return name
    if name not in VISION_PRESETS:
        raise ValueError(f"Unknown vision encoder {name!r}: use a preset ({', '.join(VISION_PRESETS)}).")
    return VISION_PRESETS[name]


def decoder_flops(
    llm,
    vision,
    text_tokens: int,
    decoder: str = BASELINE,
    *,
    vision_tokens: int | None = None,
    crops: int = 1,
    convention: str | Convention = "prefill",
    **options,
) -> dict:
    """Prefill FLOPs of the language decoder for one sample.

    text_tokens: every non-vision token in the sequence (text, and crop newlines for policies that add them).
    vision_tokens: all vision tokens of the sample (default: the encoder's tokens x crops); each crop holds
    vision_tokens / crops of them. `options` are decoder options (`LeanVLMConfig` fields, e.g.
    proxyv_start_layer=12); those of other decoders are ignored, so one set of settings serves every decoder.
    Returns {"total_flops", "breakdown", "tokens", "convention"}.
    """
    llm, vision = resolve_llm(llm), resolve_vision(vision)
    conv = CONVENTIONS[convention] if isinstance(convention, str) else convention
    check_decoder_name(decoder)
    unknown = sorted(set(options) - set(all_option_names()))
    if unknown:
        raise TypeError(f"Unknown decoder option(s) {unknown}; the decoders' options are {all_option_names()}.")
    policy = DECODERS[decoder]
    own = policy.Options(**{name: options[name] for name in option_names(policy) if name in options})
    n = vision.tokens * crops if vision_tokens is None else vision_tokens
    shape = PrefillShape(llm, vision.width, n, text_tokens, crops, full_attention=conv.attention == "full",
                         vision_heads=vision.heads)
    macs, positions = policy.prefill_macs(shape, own.resolved(llm.layers))
    if not conv.connector:
        macs.pop("connector", None)
    macs["lm_head"] = {"all": positions, "last": 1, "none": 0}[conv.lm_head] * llm.hidden * llm.vocab
    breakdown = {key: 2 * value for key, value in macs.items()}
    return {
        "total_flops": sum(breakdown.values()),
        "breakdown": breakdown,
        "tokens": {"vision": n, "text": text_tokens, "crops": crops},
        "convention": asdict(conv),
    }


def decode_flops(llm, context_tokens: int, convention: str | Convention = "prefill") -> dict:
    """FLOPs of one decoded token that attends to `context_tokens` cached keys (+ itself). Every policy decodes with
    plain layers; they differ in context: vanilla/proxyv cache N + M keys, himix N vision + M text keys, a token
    reduction its kept vision tokens + M."""
    llm = resolve_llm(llm)
    conv = CONVENTIONS[convention] if isinstance(convention, str) else convention
    d = llm.hidden
    macs = {
        "qo": llm.layers * 2 * d * llm.q_width,
        "kv": llm.layers * 2 * d * llm.kv_width,
        "attention": llm.layers * 2 * (context_tokens + 1) * llm.q_width,
        "ffn": llm.layers * 3 * d * llm.ffn,
        "lm_head": (0 if conv.lm_head == "none" else 1) * d * llm.vocab,
    }
    breakdown = {key: 2 * value for key, value in macs.items()}
    return {"total_flops": sum(breakdown.values()), "breakdown": breakdown, "context_tokens": context_tokens}


@dataclass(frozen=True)
class EncoderShape:
    """A ViT encoder's shape as its FLOPs need it."""

    hidden: int
    layers: int
    heads: int
    mlp_width: int  # the MLP's hidden width
    mlp_maps: int  # its linear maps: 2 (up, down), or 3 (SwiGLU's gate, up, down)
    patch_inputs: int  # channels x patch pixels: one patch embedding's input
    patches: int
    prefix: int  # tokens before the patches, never merged: CLS and registers (SigLIP has none)

    @classmethod
    def from_config(cls, config, image_size=None) -> EncoderShape:
        """From a Hugging Face vision config object of a type in ENCODER_TYPES; `image_size` (pixels, one int or
        (height, width)) overrides the config's, for an encoder fed other sizes (DINOv2 interpolates its positions)."""
        def pair(value) -> tuple[int, int]:
            return tuple(value) if isinstance(value, (list, tuple)) else (value, value)

        (height, width), (patch_h, patch_w) = pair(image_size or config.image_size), pair(config.patch_size)
        hidden, mlp_maps = config.hidden_size, 2
        registers = getattr(config, "num_register_tokens", 0) or 0
        prefix = int(config.model_type in CLS_FIRST) + registers
        if config.model_type != "dinov2":
            mlp_width = config.intermediate_size
        else:  # DINOv2's width comes from mlp_ratio; its SwiGLU variant, as transformers' Dinov2SwiGLUFFN builds it
            mlp_width = int(hidden * config.mlp_ratio)
            if config.use_swiglu_ffn:
                mlp_width, mlp_maps = (int(mlp_width * 2 / 3) + 7) // 8 * 8, 3
        return cls(hidden=hidden, layers=config.num_hidden_layers, heads=config.num_attention_heads,
                   mlp_width=mlp_width, mlp_maps=mlp_maps, patch_inputs=config.num_channels * patch_h * patch_w,
                   patches=(height // patch_h) * (width // patch_w), prefix=prefix)


def resolve_encoder_config(vision):
    """A vision preset name, a Hugging Face vision config (object, or dict with model_type) or a config that holds
    one as `vision_config` (leanvlm's, CLIP's, SigLIP's) -> the Hugging Face vision config object."""
    from transformers import AutoConfig

    if isinstance(vision, str):
        if vision not in VISION_CONFIGS:
            raise ValueError(f"Unknown vision encoder {vision!r}: use a preset ({', '.join(VISION_CONFIGS)}) or a "
                             "Hugging Face vision config.")
        model_type, fields = VISION_CONFIGS[vision]
        vision = {"model_type": model_type, **fields}
    get = vision.get if isinstance(vision, dict) else lambda key, default=None: getattr(vision, key, default)
    if get("vision_config") is not None:
        return resolve_encoder_config(get("vision_config"))
    if get("model_type") not in ENCODER_TYPES:
        raise ValueError(f"Vision config of type {get('model_type')!r}: encoder FLOPs are counted for "
                         f"{', '.join(ENCODER_TYPES)} configs (or a preset: {', '.join(VISION_CONFIGS)}).")
    # a dict gets the Hugging Face defaults of what it leaves out
    return AutoConfig.for_model(**vision) if isinstance(vision, dict) else vision


def encoder_flops(vision, crops: int = 1, *, layers: int | None = None, merge_per_layer: int = 0,
                  image_size: int | None = None, summaries: int = 0) -> dict:
    """Forward FLOPs of the vision encoder on `crops` crops (one sample's images), FLOPs = 2 x MACs.

    vision: a preset (VISION_CONFIGS) or a Hugging Face vision config (see `resolve_encoder_config`).
    layers: encoder layers run (default: all). leanvlm runs those up to its deepest feature layer
    (`leanvlm.encoder.layers_needed`) and never SigLIP's attention-pooling head nor the final layernorm, so neither
    is counted; nor are norms, activations, softmax and position embeddings.
    merge_per_layer: ToMe's r (arXiv 2210.09461): each layer's attention runs on its S tokens, then r tokens are
    merged away before the MLP; at most half of the mergeable (non-prefix) tokens, as bipartite matching allows.
    The matching's similarity scores are the breakdown's "merge" part (absent when r = 0).
    image_size: pixels per side the encoder is fed (default: the config's image_size).
    summaries: layers whose attention summary (`leanvlm.encoder.attention_summary`, for token selection) is
    computed besides: an explicit QK^T of the CLS row, or of every row where the encoder has no CLS token; the
    breakdown's "summary" part (absent when 0).
    Returns {"total_flops", "breakdown" (all crops), "per_crop_flops", "tokens": {"input", "output", "prefix",
    "patches"} (per crop), "layers", "crops"}.
    """
    shape = EncoderShape.from_config(resolve_encoder_config(vision), image_size)
    layers = shape.layers if layers is None else layers
    if not 0 <= layers <= shape.layers:
        raise ValueError(f"layers={layers}: this encoder has {shape.layers} layers; run 0 to {shape.layers}.")
    if crops < 1 or merge_per_layer < 0:
        raise ValueError(f"crops must be >= 1 and merge_per_layer >= 0, got {crops} and {merge_per_layer}.")
    d = shape.hidden
    tokens = first = shape.prefix + shape.patches
    macs = {"patch_embed": shape.patches * shape.patch_inputs * d, "qkvo": 0, "attention": 0, "mlp": 0}
    if merge_per_layer:
        macs["merge"] = 0
    if summaries:  # all `first` tokens (summaries refuse merging); only CLS-first encoders have a prefix
        macs["summary"] = summaries * (1 if shape.prefix else first) * first * d
    for _ in range(layers):
        macs["qkvo"] += 4 * tokens * d * d
        macs["attention"] += 2 * tokens * tokens * d  # QK^T and AV, every query against every key
        # ToMe splits the tokens alternately into sets A and B (the CLS token in A, barred from merging) and scores
        # every A x B pair on the keys averaged over heads (d / heads wide), as leanvlm.tome and ToMe's own code do;
        # at most half of the mergeable tokens merge, so one is left besides the prefix, and the MLP runs on the rest.
        merged = min(merge_per_layer, (tokens - shape.prefix) // 2)
        if merged:
            macs["merge"] += (tokens - tokens // 2) * (tokens // 2) * (d // shape.heads)
        macs["mlp"] += (tokens - merged) * shape.mlp_maps * d * shape.mlp_width
        tokens -= merged
    per_crop = 2 * sum(macs.values())
    return {
        "total_flops": per_crop * crops,
        "breakdown": {key: 2 * value * crops for key, value in macs.items()},
        "per_crop_flops": per_crop,
        # "patches": what the "patch" selection hands the decoder per crop (the prefix dropped)
        "tokens": {"input": first, "output": tokens, "prefix": shape.prefix, "patches": tokens - shape.prefix},
        "layers": layers,
        "crops": crops,
    }


def model_encoder_flops(model_config, image_size: int, crops: int = 1) -> dict:
    """`encoder_flops` of a leanvlm model's encoder on one sample's `crops` crops of `image_size` pixels, run as the
    model runs it: up to its deepest feature layer (or attention summary), merging `tome_r` tokens per layer."""
    from leanvlm.encoder import layers_needed, split_feature_keys, summarised_layers

    vision = model_config.vision_config
    states, summarised = split_feature_keys(model_config.feature_keys)
    layers = layers_needed(vision.num_hidden_layers, [*states, *summarised])
    return encoder_flops(vision, crops, layers=layers, merge_per_layer=model_config.tome_r, image_size=image_size,
                         summaries=len(summarised_layers(vision.num_hidden_layers, summarised)))


def measured_flops(model, input_ids, attention_mask=None, pixel_values=None, image_crops=None) -> int:
    """What torch's FlopCounterMode counts for one decoder prefill, to cross-check `decoder_flops`: the projection
    of the encoder features (connector or HiMix K/V, and a token reduction's own work) plus the decoder forward with
    logits for the last position. The encoder runs outside the count; attention runs on SDPA's math kernel so that
    it is counted (as a full rectangle, like the "full" attention convention)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from leanvlm.vision import encode_features, patch_grid

    config = model.config
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        context = None
        if pixel_values is not None:
            features = encode_features(model.vision_model, pixel_values, config.feature_keys,
                                       config.vision_feature_select)
            num_tokens = next(iter(features.values())).shape[1]
            grid = patch_grid(pixel_values, config.vision_config.patch_size, num_tokens)
        with FlopCounterMode(display=False) as counter:
            if pixel_values is not None:
                context = model.context_from_features(features, image_crops, grid)
            model(input_ids, attention_mask, image_context=context, logits_to_keep=1)
    return counter.get_total_flops()
