"""`LeanVLMConfig`: the language model's config, the vision encoder's config, and the decoder policy with its options."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

IMAGE_TOKEN = "<image>"

VISION_FEATURE_SELECTS = ("patch", "full", "drop_first")
CONNECTOR_TYPES = ("mlp2x_gelu", "linear")


class LeanVLMConfig(PreTrainedConfig):
    """Configuration of a `LeanVLMForConditionalGeneration`.

    The two sub-configs are ordinary Hugging Face configs (any supported causal LM, any vision encoder that returns
    hidden states); everything else says how the vision tokens reach the language decoder.
    """

    model_type = "leanvlm"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None

    # Which decoder policy runs the language model: "vanilla" or "himix" (see `leanvlm.decoders`).
    decoder: str = "vanilla"
    # Id of the `<image>` placeholder in `input_ids`; one placeholder stands for one whole image.
    image_token_id: int | None = None
    # Vision encoder hidden state to use (index into `hidden_states`, -2 = output of the penultimate layer).
    vision_feature_layer: int = -2
    # "patch": drop the encoder's prefix tokens (CLS, registers) when it has any; "full": keep every token;
    # "drop_first": always drop token 0, as LLaVA's "default" strategy does even on SigLIP (HiMix's 728 tokens).
    vision_feature_select: str = "patch"
    # The vision encoder is frozen by default (no gradients, kept in eval mode).
    freeze_vision: bool = True

    # vanilla: connector from vision width to LLM width.
    connector_type: str = "mlp2x_gelu"
    connector_act: str = "gelu"
    connector_bias: bool = True

    # himix: vision-encoder layers mapped onto consecutive groups of decoder layers (None = `vision_feature_layer`
    # for every decoder layer, as in the paper).
    himix_feature_layers: list[int] | None = None

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
        from leanvlm.decoders import check_decoder_name
        from leanvlm.llm import check_supported_text_config

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
        num_states = getattr(self.vision_config, "num_hidden_layers", None)
        if num_states is not None:  # hidden_states holds the embeddings plus one state per encoder layer
            num_states += 1
            for layer in [self.vision_feature_layer, *(self.himix_feature_layers or [])]:
                if isinstance(layer, int) and not -num_states <= layer < num_states:
                    raise ValueError(
                        f"Vision feature layer {layer} does not exist: the encoder returns {num_states} hidden "
                        f"states (valid indices {-num_states}..{num_states - 1})."
                    )
        if self.himix_feature_layers is not None:
            if self.decoder != "himix":
                raise ValueError(f"himix_feature_layers is a himix option; this config's decoder is {self.decoder!r}.")
            layers = list(self.himix_feature_layers)
            if not layers or not all(isinstance(x, int) for x in layers):
                raise ValueError(f"himix_feature_layers must be a non-empty list of ints, got {layers!r}.")
            if len(layers) > self.text_config.num_hidden_layers:
                raise ValueError(
                    f"himix_feature_layers has {len(layers)} entries but the language model has only "
                    f"{self.text_config.num_hidden_layers} decoder layers to map them onto."
                )

    @property
    def feature_layers(self) -> list[int]:
        """Vision-encoder hidden-state indices the decoder consumes."""
        if self.decoder == "himix" and self.himix_feature_layers is not None:
            return list(self.himix_feature_layers)
        return [self.vision_feature_layer]
