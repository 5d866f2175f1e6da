"""Analytic cost model of the language decoder under each policy: prefill FLOPs and per-token decode FLOPs, with a
breakdown by part. FLOPs = 2 x multiply-accumulates; norms, RoPE, softmax and activations are not counted (they are
a few percent and no paper counts them).

Counting conventions are explicit (`Convention`); the papers' own are presets:
- "himix-paper": attention as a full rectangle, lm_head on every position, no connector (HiMix Table, N=728, M=64).
- "proxyv-paper": attention as a full rectangle, no lm_head, no connector (ProxyV, 2880 vision + 55 other tokens).
- "prefill" (default): what an efficient prefill computes: causal attention pairs, lm_head on the last position only,
  connector counted.
Token layout assumed for causal counts: the image(s) come before the text, and crop newlines are counted as text
after all crops (the exact masks differ by a few percent of the attention term). Probe counts are what the probe
could save; leanvlm's probes compute and discard the vision rows. The attention-skip probe drops the vision rows'
q and o projections (ProxyV's Table 1 keeps o counted).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

from leanvlm.decoders.proxyv import proxyv_inner_width

DECODERS = ("vanilla", "himix", "proxyv")


@dataclass(frozen=True)
class LLMShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config) -> LLMShape:
        """From a Hugging Face text config (object or dict); a leanvlm config contributes its text_config."""
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        if get("text_config") is not None:
            return cls.from_config(get("text_config"))
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        return cls(
            hidden=hidden,
            layers=get("num_hidden_layers"),
            heads=heads,
            kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or hidden // heads,
            ffn=get("intermediate_size"),
            vocab=get("vocab_size"),
        )


@dataclass(frozen=True)
class VisionShape:
    tokens: int  # per image (one crop)
    width: int


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
# Vision encoders as Hugging Face config fields (full depth); `leanvlm bench` builds random-weight encoders from them.
VISION_CONFIGS = {
    "siglip-so400m-384": ("siglip_vision_model", dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                      num_attention_heads=16, image_size=384, patch_size=14)),
    "clip-l-336": ("clip_vision_model", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                             num_attention_heads=16, image_size=336, patch_size=14)),
    "dinov2-s14-224": ("dinov2", dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                                      num_attention_heads=6, image_size=224, patch_size=14)),
}
VISION_PRESETS = {  # patch tokens per image (CLS dropped) and width
    name: VisionShape((fields["image_size"] // fields["patch_size"]) ** 2, fields["hidden_size"])
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
            return LLMShape.from_config(json.load(f))
    raise ValueError(
        f"Unknown LLM {name_or_path!r}: use a preset ({', '.join(LLM_PRESETS)}) or a Hugging Face config.json path."
    )


def resolve_vision(name) -> VisionShape:
    if isinstance(name, VisionShape):
        return name
    if name not in VISION_PRESETS:
        raise ValueError(f"Unknown vision encoder {name!r}: use a preset ({', '.join(VISION_PRESETS)}).")
    return VISION_PRESETS[name]


def _causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def decoder_flops(
    llm,
    vision,
    text_tokens: int,
    decoder: str = "vanilla",
    *,
    vision_tokens: int | None = None,
    crops: int = 1,
    convention: str | Convention = "prefill",
    proxyv_start_layer: int | None = None,
    proxyv_reduce_factor: int = 4,
    proxyv_mlp_width: int | None = None,
    proxyv_proxy_init: str = "spatial",
    probe_mask_vision_to_vision_from_layer: int | None = None,
    probe_skip_vision_attention_from_layer: int | None = None,
    probe_skip_vision_ffn_from_layer: int | None = None,
    probe_vision_light_mlp: bool = False,
) -> dict:
    """Prefill FLOPs of the language decoder for one sample.

    text_tokens: every non-vision token in the sequence (text, and crop newlines for vanilla/proxyv).
    vision_tokens: all vision tokens of the sample (default: the encoder's tokens x crops); each crop holds
    vision_tokens / crops of them. Returns {"total_flops", "breakdown", "tokens", "convention"}.
    """
    llm, vision = resolve_llm(llm), resolve_vision(vision)
    conv = CONVENTIONS[convention] if isinstance(convention, str) else convention
    if decoder not in DECODERS:
        raise ValueError(f"Unknown decoder {decoder!r}; available decoders: {', '.join(DECODERS)}.")
    if proxyv_start_layer is not None and proxyv_start_layer < 0:
        raise ValueError(f"proxyv_start_layer must be >= 0, got {proxyv_start_layer}.")
    n = vision.tokens * crops if vision_tokens is None else vision_tokens
    m, d, layers = text_tokens, llm.hidden, llm.layers
    macs: dict[str, float] = {"qo": 0, "kv": 0, "attention": 0, "ffn": 0}

    def layer(rows_q: int, rows_kv: int, pairs: int, rows_ffn: int | None = None) -> None:
        macs["qo"] += rows_q * 2 * d * llm.q_width
        macs["kv"] += rows_kv * 2 * d * llm.kv_width
        macs["attention"] += 2 * pairs * llm.q_width  # QK^T and AV
        macs["ffn"] += (rows_q if rows_ffn is None else rows_ffn) * 3 * d * llm.ffn

    full = conv.attention == "full"
    if decoder == "himix":
        pairs = m * (n + m) if full else m * n + _causal_pairs(m)
        for _ in range(layers):
            layer(m, m, pairs)
        macs["vision_kv"] = layers * n * 2 * vision.width * llm.kv_width
        positions = m
    else:
        t = n + m
        dense_pairs = t * t if full else _causal_pairs(t)
        start = layers if decoder == "vanilla" else min(proxyv_start_layer if proxyv_start_layer is not None
                                                         else layers // 2, layers)
        probes = {
            "mask": probe_mask_vision_to_vision_from_layer,
            "attention": probe_skip_vision_attention_from_layer,
            "ffn": probe_skip_vision_ffn_from_layer,
        }
        light_from = probes["ffn"] if probe_vision_light_mlp else None
        vision_query_pairs = n * t if full else _causal_pairs(n)  # vision queries (image first)
        vision_vision_pairs = n * n if full else _causal_pairs(n)
        for index in range(start):
            rows_q, pairs, rows_ffn = t, dense_pairs, t
            if decoder == "vanilla":
                active = {k: v is not None and index >= v for k, v in probes.items()}
                no_attention = active["attention"] or (light_from is not None and index >= light_from)
                if no_attention:
                    rows_q, pairs = m, pairs - vision_query_pairs
                elif active["mask"]:
                    pairs -= vision_vision_pairs
                if active["ffn"]:
                    rows_ffn = m
                if light_from is not None and index >= light_from:
                    quarter = d // 4
                    macs["probe_light_mlps"] = macs.get("probe_light_mlps", 0) + n * (2 * d * quarter + quarter**2)
            layer(rows_q, t, pairs, rows_ffn)
        if start < layers:  # proxyv layers
            side = math.isqrt(n // crops)  # square grids as `proxyv.proxy_grid` sizes them; otherwise an estimate
            per_crop = (max(1, side // proxyv_reduce_factor) ** 2 if side * side == n // crops
                        else max(1, n // crops // proxyv_reduce_factor**2))
            proxies = per_crop * crops
            inner = proxyv_inner_width(d, proxyv_mlp_width)
            q, k = proxies + m, n + proxies + m
            pairs = q * k if full else _causal_pairs(proxies) + m * n + _causal_pairs(m)
            for _ in range(start, layers):
                layer(q, k, pairs)
            per_layer = n * (d * inner + 2 * inner * inner + inner * d) + proxies * d * inner
            macs["vision_mlps"] = (layers - start) * per_layer
            if proxyv_proxy_init == "learned":
                macs["vision_mlps"] += (layers - start) * n * per_crop * inner  # spreading the guide
                macs["proxy_init"] = n * d * inner + proxies * (n // crops) * (inner + d)  # keys, logits, pooling
        if conv.connector:
            macs["connector"] = n * (vision.width * d + d * d)
        positions = t
    macs["lm_head"] = {"all": positions, "last": 1, "none": 0}[conv.lm_head] * d * llm.vocab
    breakdown = {key: 2 * value for key, value in macs.items()}
    return {
        "total_flops": sum(breakdown.values()),
        "breakdown": breakdown,
        "tokens": {"vision": n, "text": m, "crops": crops},
        "convention": asdict(conv),
    }


def decode_flops(llm, context_tokens: int, convention: str | Convention = "prefill") -> dict:
    """FLOPs of one decoded token that attends to `context_tokens` cached keys (+ itself). Every policy decodes with
    plain layers; they differ in context: vanilla/proxyv cache N + M keys, himix N vision + M text keys."""
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


def measured_flops(model, input_ids, attention_mask=None, pixel_values=None, image_crops=None) -> int:
    """What torch's FlopCounterMode counts for one decoder prefill, to cross-check `decoder_flops`: the projection
    of the encoder features (connector or HiMix K/V) plus the decoder forward with logits for the last position.
    The encoder runs outside the count; attention runs on SDPA's math kernel so that it is counted (as a full
    rectangle, like the "full" attention convention)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from leanvlm.decoders.base import ImageContext
    from leanvlm.vision import encode_features, patch_grid

    config = model.config
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        context = None
        if pixel_values is not None:
            features = encode_features(model.vision_model, pixel_values, config.feature_layers,
                                       config.vision_feature_select)
            num_tokens = next(iter(features.values())).shape[1]
            grid = patch_grid(pixel_values, config.vision_config.patch_size, num_tokens)
        with FlopCounterMode(display=False) as counter:
            if pixel_values is not None:
                tokens = model.decoder.project_images({k: v.to(model.dtype) for k, v in features.items()})
                context = ImageContext(config.decoder, tokens, image_crops, grid)
            model(input_ids, attention_mask, image_context=context, logits_to_keep=1)
    return counter.get_total_flops()
