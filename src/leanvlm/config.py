"""`LeanVLMConfig`: the language model's and vision encoder's configs, and the decoder policy with its options."""

from __future__ import annotations

import yaml
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from leanvlm.decoders import BASELINE, DECODERS, all_option_names, check_decoder_name, option_names
from leanvlm.decoders.llm import check_supported_text_config
from leanvlm.encoder import ENCODER_TYPES, check_summaries, split_feature_keys

IMAGE_TOKEN = "<image>"

VISION_FEATURE_SELECTS = ("patch", "full", "drop_first")

CONNECTOR_TYPES = ("mlp2x_gelu", "linear")


class LeanVLMConfig(PreTrainedConfig):
    """Configuration of a `LeanVLMForConditionalGeneration`.

    The two sub-configs are ordinary Hugging Face configs (any supported causal LM, any vision encoder that returns
    hidden states); everything else says how the vision tokens reach the language decoder.
    """

    model_type = "leanvlm"
    # a class attribute that transformers reads, never mutated
    sub_configs_defaults = {  # noqa: RUF012
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None

    # Which decoder policy runs the language model: a name in `leanvlm.decoders.DECODERS`.
    decoder: str = BASELINE
    # Id of the `<image>` placeholder in `input_ids`; one placeholder stands for one whole image.
    image_token_id: int | None = None
    # Vision encoder hidden state to use (index into `hidden_states`, -2 = output of the penultimate layer).
    vision_feature_layer: int = -2
    # "patch": drop the encoder's prefix tokens (CLS, registers) when it has any; "full": keep every token;
    # "drop_first": always drop token 0, as LLaVA's "default" strategy does even on SigLIP (HiMix's 728 tokens).
    vision_feature_select: str = "patch"
    # The vision encoder is frozen by default (no gradients, kept in eval mode).
    freeze_vision: bool = True
    # ToMe token merging inside the encoder (`leanvlm.tome`): tokens merged away per encoder layer, 0 = off. Merged
    # tokens have no patch grid, so it serves policies that take the vision tokens as a set or a sequence.
    tome_r: int = 0

    # Policies with vision tokens in the sequence: connector from vision width to LLM width.
    connector_type: str = "mlp2x_gelu"
    connector_act: str = "gelu"
    connector_bias: bool = True

    # Multi-crop (AnyRes) images: at most `max_crops` crops per image (base view + sub-crops); 1 = single crop.
    max_crops: int = 1
    # Candidate high-resolution grids in pixels [[width, height], ...]; None = 1x2, 2x1, 2x2, 3x1, 1x3 crops.
    image_grid_pinpoints: list[list[int]] | None = None
    # Policies with vision tokens in the sequence: a learned newline embedding after each crop's tokens. None = on
    # iff max_crops > 1 (single-crop images then keep the LLaVA-1.5 layout).
    image_newline: bool | None = None

    # Each policy's own options, documented with its `Options` dataclass (the same names and defaults; the
    # registry tests check that they agree). HiMix (`HiMixOptions`):
    himix_feature_layers: list[int] | None = None
    himix_zero_init_values: bool = False
    himix_separate_vision_softmax: bool = False
    himix_layers: list[int] | None = None

    # ProxyV (`ProxyVOptions`):
    proxyv_start_layer: int | None = None
    proxyv_reduce_factor: int = 4
    proxyv_proxy_init: str = "spatial"
    proxyv_mlp_width: int | None = None
    # A token reduction ("random", "pool", "divprune") that first cuts each crop's tokens, with that policy's budget
    # options below; spatial proxies need the kept tokens to form a grid (pool), learned ones take any.
    proxyv_token_reduction: str | None = None
    # The vanilla decoder's frozen vision layers and redundancy probes (`VanillaOptions`):
    frozen_vision_layers: list[int] | None = None
    probe_mask_vision_to_vision_from_layer: int | None = None
    probe_skip_vision_attention_from_layer: int | None = None
    probe_skip_vision_ffn_from_layer: int | None = None
    probe_vision_light_mlp: bool = False

    # Token budgets (random, pool, divprune, visionzip, proxyv with proxyv_token_reduction, and fastv;
    # `ReductionOptions`): vision tokens kept per crop, or the fraction of each crop's tokens kept instead; random's
    # seed for the kept positions (`RandomOptions`).
    keep_tokens: int = 64
    keep_ratio: float | None = None
    random_seed: int = 0
    # VisionZip (`VisionZipOptions`): merged contextual tokens per crop, of the budget; None = 10 of every 64
    visionzip_contextual: int | None = None
    # FastV (`FastVOptions`, with the budget above): the first decoder layer that reads only the kept tokens.
    fastv_layer: int = 2
    # PyramidDrop (`PyramidDropOptions`): the layers at which each crop keeps a further `pyramid_keep` fraction of
    # its tokens (None: 1/4, 1/2 and 3/4 of the depth).
    pyramid_layers: list[int] | None = None
    pyramid_keep: float = 0.5
    # ViCA (`ViCAOptions`): the decoder layers whose text attends to the vision tokens (None: every fourth).
    vica_layers: list[int] | None = None

    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # transformers pushes the composite's (unset) attention implementation down to the sub-configs; keep the one
        # an already-built part runs with (the vision encoder's attention reads it at call time).
        kept = {
            key: part._attn_implementation_internal
            for key in ("text_config", "vision_config")
            if isinstance(part := getattr(self, key), PreTrainedConfig)
        }
        super().__post_init__(**kwargs)
        for key, implementation in kept.items():
            if implementation is not None:
                getattr(self, key)._attn_implementation_internal = implementation
        # Tying is a property of the language model; mirror it so that transformers' loading logic sees it.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        self.validate_options()

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        # `decoder` here names the decoder policy (a string), not a sub-config: the text config is `text_config`.
        return self.text_config

    def validate_options(self) -> None:
        """Raise a `ValueError` naming the offending option and its valid values."""
        check_decoder_name(self.decoder)
        check_supported_text_config(self.text_config)
        if self.vision_feature_select not in VISION_FEATURE_SELECTS:
            raise ValueError(
                f"vision_feature_select={self.vision_feature_select!r} is not one of {VISION_FEATURE_SELECTS}."
            )
        if self.connector_type not in CONNECTOR_TYPES:
            raise ValueError(f"connector_type={self.connector_type!r} is not one of {CONNECTOR_TYPES}.")
        if not isinstance(self.vision_feature_layer, int):
            raise ValueError(
                f"vision_feature_layer must be one int (got {self.vision_feature_layer!r}); for several encoder "
                "layers with the himix decoder use himix_feature_layers=[...]."
            )
        self._validate_policy_options()
        self._validate_token_merging()
        self._validate_attention_summaries()
        num_states = getattr(self.vision_config, "num_hidden_layers", None)
        if num_states is not None:  # hidden_states holds the embeddings plus one state per encoder layer
            num_states += 1
            for layer in {self.vision_feature_layer, *self.feature_layers}:
                if not -num_states <= layer < num_states:
                    raise ValueError(
                        f"Vision feature layer {layer} does not exist: the encoder returns {num_states} hidden "
                        f"states (valid indices {-num_states}..{num_states - 1})."
                    )
        if self.max_crops < 1:
            raise ValueError(f"max_crops must be >= 1, got {self.max_crops}.")
        if self.max_crops > 1:
            from leanvlm.crops import default_pinpoints, usable_pinpoints

            size = self.vision_config.image_size
            pinpoints = self.image_grid_pinpoints or default_pinpoints(size)
            if any(len(p) != 2 or min(p) < 1 for p in pinpoints):
                raise ValueError(f"image_grid_pinpoints must be [[width, height], ...], got {pinpoints}.")
            if not usable_pinpoints(pinpoints, size, self.max_crops):
                raise ValueError(
                    f"No grid in image_grid_pinpoints ({pinpoints}) fits max_crops={self.max_crops} with the base "
                    "view; allow more crops or give smaller grids."
                )

    def _validate_token_merging(self) -> None:
        if not isinstance(self.tome_r, int) or self.tome_r < 0:
            raise ValueError(f"tome_r must be an int >= 0 (tokens merged per encoder layer), got {self.tome_r!r}.")
        if not self.tome_r:
            return
        if self.vision_config.model_type not in ENCODER_TYPES:
            raise ValueError(f"tome_r={self.tome_r}: token merging runs in {', '.join(ENCODER_TYPES)} encoders, "
                             f"not {self.vision_config.model_type}.")
        if DECODERS[self.decoder].needs_patch_grid:
            raise ValueError(
                f"tome_r={self.tome_r} merges the encoder's tokens out of their patch grid, which the {self.decoder} "
                "decoder pools; use tome_r=0 with it, or a decoder that takes the tokens as they come."
            )
        if len(set(self.feature_layers)) > 1:
            raise ValueError(
                f"tome_r={self.tome_r} leaves a different number of tokens after each encoder layer, so the feature "
                f"layers {self.feature_layers} cannot be combined; read one layer with it."
            )

    def _validate_attention_summaries(self) -> None:
        """A decoder that ranks tokens by the encoder's attention (visionzip) needs leanvlm's own encoder loop, the
        unmerged tokens, and a feature layer that some encoder layer outputs."""
        summarised = split_feature_keys(self.feature_keys)[1]
        try:
            check_summaries(self.vision_config.model_type, self.vision_config.num_hidden_layers, summarised,
                            self.tome_r)
        except ValueError as error:
            raise ValueError(f"The {self.decoder} decoder ranks tokens by the encoder's attention "
                             f"(vision_feature_layer={self.vision_feature_layer}): {error}") from None

    def _validate_policy_options(self) -> None:
        """Options of other policies only must stay at their defaults (one option may belong to several policies,
        e.g. `keep_tokens`); this policy's own are checked and resolved (e.g. ProxyV's start layer defaults to the
        middle layer) by its `Options`, which also refuses own options that its other values leave unread."""
        policy = DECODERS[self.decoder]
        own = set(option_names(policy))
        changed = dict.fromkeys(name for other in DECODERS.values() for name in other.options_from(self).changed())
        foreign = [name for name in changed if name not in own]
        if foreign:
            takers = [other for other in DECODERS.values() if set(foreign) <= set(option_names(other))]
            # the taker with the fewest options is the one they are about (keep_tokens: a reduction's, not proxyv's)
            what = min(takers, key=lambda other: len(option_names(other))).options_are if takers else (
                "options of different decoders")
            use = f"decoder={' or '.join(repr(other.name) for other in takers)}" if takers else "one decoder's options"
            raise ValueError(
                f"{', '.join(foreign)}: {what}, but this config's decoder is {self.decoder!r}; use {use} or leave "
                f"{'it' if len(foreign) == 1 else 'them'} unset."
            )
        resolved = policy.options_from(self).resolved(self.text_config.num_hidden_layers)
        resolved.refuse_unread()
        for name in own:
            setattr(self, name, getattr(resolved, name))

    @property
    def uses_image_newline(self) -> bool:
        if not DECODERS[self.decoder].keeps_vision_tokens:  # no layout for a newline to mark
            return False
        return self.image_newline if self.image_newline is not None else self.max_crops > 1

    @property
    def feature_layers(self) -> list[int]:
        """Vision-encoder hidden-state indices the decoder consumes."""
        return DECODERS[self.decoder].feature_layers(self)

    @property
    def feature_keys(self) -> list:
        """Every encoder output the decoder reads (its feature layers and any attention summaries), as the feature
        cache keys them."""
        return DECODERS[self.decoder].feature_keys(self)


def parse_variant(text: str) -> tuple[str, str, dict]:
    """A decoder name, optionally with model options: `NAME+key=value+...` (e.g. `proxyv+proxyv_start_layer=12`,
    `himix+tome_r=8`) -> (label, decoder, LeanVLMConfig options)."""
    decoder, *settings = text.split("+")
    if decoder not in DECODERS:
        *others, last = DECODERS
        raise ValueError(f"{text!r}: a variant starts with {', '.join(others)} or {last}.")
    options = {}
    for setting in settings:
        if "=" not in setting:
            raise ValueError(f"{text!r}: options look like +key=value, got {setting!r}.")
        key, value = setting.split("=", 1)
        if key in all_option_names() and key not in option_names(DECODERS[decoder]):
            raise ValueError(f"{text!r}: {key} is not an option of {decoder}.")
        options[key] = yaml.safe_load(value)
    return text, decoder, options
