"""`LeanVLMForConditionalGeneration`: a Hugging Face causal LM plus a vision encoder, run by a decoder policy."""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.utils import GENERATION_CONFIG_NAME, ModelOutput

from leanvlm import generation
from leanvlm.config import LeanVLMConfig
from leanvlm.decoders import BASELINE, DECODERS, build_decoder
from leanvlm.decoders.base import (
    IGNORE_INDEX,
    DecoderInputs,
    ImageContext,
    assign_images,
    positions_from_valid,
)
from leanvlm.decoders.cache import DecoderCache, KVCache
from leanvlm.decoders.llm import check_supported_text_config, decoder_layers
from leanvlm.decoders.runner import run_decoder
from leanvlm.decoders.vanilla import VanillaDecoder
from leanvlm.hub import PARTS, pretrained_part
from leanvlm.processing import ensure_image_token
from leanvlm.vision import encode_features, patch_grid


@dataclass
class LeanVLMOutput(ModelOutput):
    """`logits` follow the decoder's own sequence layout, described by `attention_mask` (left-padded; vanilla and
    proxyv: each image's tokens in place of its placeholder; himix: text tokens only). `labels` are mapped the same
    way."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: KVCache | None = None
    attention_mask: torch.Tensor | None = None
    # with output_hidden_states: the input embeddings and each layer's output (before the final norm), same layout
    hidden_states: tuple[torch.Tensor, ...] | None = None
    # True at vision-token positions of the layout (vanilla/proxyv)
    vision_mask: torch.Tensor | None = None


class LeanVLMPreTrainedModel(PreTrainedModel):
    config_class = LeanVLMConfig
    config: LeanVLMConfig
    base_model_prefix = "leanvlm"
    supports_gradient_checkpointing = True
    input_modalities = ("image", "text")

    @classmethod
    def can_generate(cls) -> bool:
        # leanvlm has its own `generate`; this gives the model a `generation_config`, saved with it.
        return True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if os.path.isdir(str(pretrained_model_name_or_path)):
            check_weight_files(str(pretrained_model_name_or_path))
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if kwargs.get("output_loading_info") else loaded  # (model, loading info)
        # transformers reads generation_config.json only for GenerationMixin models; read it here.
        if os.path.isfile(os.path.join(str(pretrained_model_name_or_path), GENERATION_CONFIG_NAME)):
            model.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path)
        return loaded

    def _init_weights(self, module):
        # New vision-side modules (connector, HiMix vision K/V, ProxyV MLPs): Linear and RMSNorm layers as the LLM's
        # own `_init_weights` would; raw parameters as the decoder policy defines them.
        std = self.config.text_config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "zero_init", False):  # a policy option's zero start (himix_zero_init_values)
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif "RMSNorm" in type(module).__name__ and getattr(module, "weight", None) is not None:
            init.ones_(module.weight)
        else:
            self.decoder.init_module(module)


class LeanVLMForConditionalGeneration(LeanVLMPreTrainedModel):
    def __init__(
        self, config: LeanVLMConfig, language_model: PreTrainedModel | None = None, vision_model: nn.Module = None
    ):
        super().__init__(config)
        config.validate_options()  # again: from_pretrained applies overrides after the config was built
        given = [part for part in (language_model, vision_model) if part is not None]
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        self.vision_model = vision_model or AutoModel.from_config(config.vision_config)
        # New vision-side modules live where the LLM lives, in its dtype.
        reference = self.language_model.get_input_embeddings().weight
        self.decoder = build_decoder(config, self.language_model).to(device=reference.device, dtype=reference.dtype)
        for part in given:  # pretrained parts keep their weights through `post_init`
            for module in part.modules():
                module._is_hf_initialized = True
        self.gradient_checkpointing = False
        self.post_init()
        if config.freeze_vision:
            self.vision_model.requires_grad_(False)
            self.vision_model.eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_parts(
        cls,
        language_model,
        vision_model,
        decoder: str = BASELINE,
        tokenizer=None,
        image_token_id: int | None = None,
        dtype: torch.dtype | None = None,
        **options,
    ) -> LeanVLMForConditionalGeneration:
        """Assemble a VLM from an LLM and a vision encoder, each a model object, a local directory, a config (random
        init), or the name of a packaged pretrained part ("smollm2-135m", "dinov2-s14"; see `leanvlm.hub`). `options`
        are `LeanVLMConfig` fields (decoder options, feature layer, connector...).

        The `<image>` placeholder id is `image_token_id` if given, else the tokenizer's `<image>` token (added to the
        tokenizer when missing), else a new id after the vocabulary; the embeddings grow when the id needs it.
        """
        unknown = sorted(set(options) - set(LeanVLMConfig.__dataclass_fields__))
        if unknown:
            raise TypeError(f"Unknown option(s) {unknown}; valid options are the fields of LeanVLMConfig.")
        language_model = _load_language_model(language_model, dtype)
        vision_model = load_vision_model(vision_model, dtype)
        if image_token_id is None and tokenizer is not None:
            image_token_id = ensure_image_token(tokenizer)
        vocab_rows = language_model.get_input_embeddings().num_embeddings
        if image_token_id is None:
            image_token_id = vocab_rows
        if image_token_id >= vocab_rows:
            language_model.resize_token_embeddings(image_token_id + 1, mean_resizing=False)
        config = LeanVLMConfig(
            text_config=language_model.config,
            vision_config=vision_model.config,
            decoder=decoder,
            image_token_id=image_token_id,
            **options,
        )
        model = cls(config, language_model=language_model, vision_model=vision_model)
        if getattr(language_model, "generation_config", None) is not None:  # e.g. an instruct model's end-of-turn ids
            model.generation_config = copy.deepcopy(language_model.generation_config)
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_llava(cls, llava) -> LeanVLMForConditionalGeneration:
        """Import a Hugging Face `LlavaForConditionalGeneration` (object or local directory) as a `vanilla` model
        with the same outputs. The result shares the Llava model's weights (no copy, same device and dtype)."""
        from transformers import LlavaForConditionalGeneration

        if isinstance(llava, (str, os.PathLike)):
            llava = LlavaForConditionalGeneration.from_pretrained(_existing_dir(llava, "Llava checkpoint"))
        source = llava.config
        if not isinstance(source.vision_feature_layer, int):
            raise ValueError(
                f"This Llava checkpoint concatenates several vision layers ({source.vision_feature_layer}); "
                "leanvlm's vanilla decoder takes one vision_feature_layer."
            )
        config = LeanVLMConfig(
            text_config=source.text_config,
            vision_config=source.vision_config,
            decoder=VanillaDecoder.name,
            image_token_id=source.image_token_id,
            vision_feature_layer=source.vision_feature_layer,
            vision_feature_select={"default": "drop_first", "full": "full"}[source.vision_feature_select_strategy],
            connector_type="mlp2x_gelu",
            connector_act=source.projector_hidden_act,
            connector_bias=source.multimodal_projector_bias,
        )
        with torch.device("meta"):  # an empty causal-LM shell around Llava's own decoder and head
            language_model = AutoModelForCausalLM.from_config(source.text_config)
        language_model.model, language_model.lm_head = llava.model.language_model, llava.lm_head
        model = cls(config, language_model=language_model, vision_model=llava.model.vision_tower)
        model.decoder.connector.load_state_dict(llava.model.multi_modal_projector.state_dict())
        model.generation_config = copy.deepcopy(llava.generation_config)
        return model

    # ------------------------------------------------------------------ running
    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_vision:
            self.vision_model.eval()
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by group name, for per-stage training recipes: the decoder policy's new vision-side groups
        (e.g. vanilla "connector", himix "vision_kv", proxyv "connector" + "vision_mlps") plus "language_model" and
        "vision_model". Every parameter is in exactly one group."""
        return {
            **self.decoder.parameter_groups(),
            "language_model": list(self.language_model.parameters()),
            "vision_model": list(self.vision_model.parameters()),
        }

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def encode_images(self, pixel_values: torch.Tensor, image_crops=None) -> ImageContext:
        """Encode images once into what this decoder consumes (vanilla/proxyv: projected tokens; himix: every
        layer's vision keys/values). `pixel_values` holds one row per crop and `image_crops` the crops per image
        (default: one each), as the processor returns them. Pass the result as `image_context=` to
        `forward`/`generate` with any prompts."""
        crops = None
        if image_crops is not None:
            crops = [int(c) for c in torch.as_tensor(image_crops).flatten().tolist()]
            rows = pixel_values.shape[0] if isinstance(pixel_values, torch.Tensor) and pixel_values.ndim else 0
            if sum(crops) != rows:
                raise ValueError(
                    f"image_crops declares {sum(crops)} crop(s) in total (per image: {crops}) but pixel_values "
                    f"holds {rows}. Pass the image_crops the processor returned with these pixel_values."
                )
            if crops and max(crops) > self.config.max_crops:
                raise ValueError(
                    f"An image has {max(crops)} crops but this model takes at most max_crops={self.config.max_crops}."
                )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vision):
            features = encode_features(self.vision_model, pixel_values, self.config.feature_keys,
                                       self.config.vision_feature_select, self.config.tome_r)
        num_tokens = next(iter(features.values())).shape[1]
        grid = patch_grid(pixel_values, self.config.vision_config.patch_size, num_tokens)
        return self.context_from_features(features, crops, grid)

    def context_from_features(self, features: dict, image_crops=None, grid=None) -> ImageContext:
        """An image context from encoder features {layer: (n_crops, N, d_v)} (e.g. from the feature cache). `grid` is
        the patch grid of each crop's N features; without it, square crops are assumed: the N features form a
        sqrt(N) x sqrt(N) grid when N is a square. The context's grid is that of the tokens the decoder keeps."""
        missing = [key for key in self.config.feature_keys if key not in features]
        if missing:
            raise ValueError(f"vision_features lacks encoder output(s) {missing}; this model reads "
                             f"{self.config.feature_keys}. Encode the features for this model (its decoder and "
                             "options), e.g. with `leanvlm data encode --model`.")
        dtype = self.get_input_embeddings().weight.dtype
        device = self.get_input_embeddings().weight.device
        tokens = self.decoder.project_images(
            {key: features[key].to(device, dtype) for key in self.config.feature_keys}
        )
        num_features = features[self.config.feature_layers[0]].shape[1]
        if grid is None and not self.config.tome_r:  # merged tokens form no grid
            side = math.isqrt(num_features)
            grid = (side, side) if side * side == num_features else None
        tokens, grid = self.decoder.reduce_tokens(tokens, grid)
        crops = None if image_crops is None else [int(c) for c in torch.as_tensor(image_crops).flatten().tolist()]
        return ImageContext(self.config.decoder, tokens, crops, grid)

    def new_cache(self, reserve: int = 0) -> KVCache:
        """An empty key/value cache for this model; `reserve` more slots are allocated with the prefill (e.g. the
        tokens to generate)."""
        return KVCache(len(decoder_layers(self.language_model)), reserve=reserve)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_context: ImageContext | None = None,
        labels: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        image_crops: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_logits: bool = True,
        vision_features: dict | None = None,
        **kwargs,
    ) -> LeanVLMOutput:
        """Training/scoring forward, or a prefill into `cache` (a new one with `use_cache`); with a filled `cache`,
        a continuation over new text tokens, whose `attention_mask` then covers only the new tokens (generation
        calls `prefill` and `decode_step` instead). Images come one way: `pixel_values` (+ `image_crops`), an
        `image_context` from `encode_images`, or cached encoder `vision_features` (+ `image_crops`).
        `logits_to_keep=k` computes logits for the last k positions only (0 = all); `return_logits=False` skips them
        (training: the loss needs only the scored positions)."""
        if "past_key_values" in kwargs:  # the name before transformers 5.24
            if cache is not None:
                raise TypeError("Pass the cache once, as cache= (past_key_values is its former name).")
            warnings.warn("past_key_values= is now cache=, as in transformers 5.24.", FutureWarning, stacklevel=2)
            cache = kwargs.pop("past_key_values")
        if kwargs:
            raise TypeError(f"Unexpected argument(s) {sorted(kwargs)}.")
        valid = _valid_mask(input_ids, attention_mask)
        _check_labels(labels, input_ids, logits_to_keep)
        if cache is not None and cache.length:
            self._check_continuation(input_ids, (pixel_values, image_context, vision_features), labels, cache)
            inputs = self._continuation_inputs(input_ids, valid, cache)
        else:
            context = self._image_context(pixel_values, image_crops, image_context, vision_features)
            inputs = self._prefill_inputs(input_ids, valid, context, labels)
            if cache is None and use_cache:
                cache = self.new_cache()
        return self._run(inputs, cache, logits_to_keep, output_hidden_states, return_logits)

    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        image_crops: torch.Tensor | None = None,
        image_context: ImageContext | None = None,
        vision_features: dict | None = None,
        cache: DecoderCache,
        logits_to_keep: int = 1,
    ) -> LeanVLMOutput:
        """Run left-padded prompts and their images (given one way, as in `forward`) into the empty `cache`; the
        output holds the logits of the last `logits_to_keep` positions, (B, k, vocab). Continue with `decode_step`;
        to add these rows to a running batch, prefill them into a new cache and `merge` it into the running one."""
        if cache.length:
            raise ValueError(
                "prefill fills an empty cache, but this one already holds tokens: continue it with decode_step, or "
                "prefill a new cache (model.new_cache()) and merge it into this one."
            )
        valid = _valid_mask(input_ids, attention_mask)
        context = self._image_context(pixel_values, image_crops, image_context, vision_features)
        return self._run(self._prefill_inputs(input_ids, valid, context, None), cache, logits_to_keep)

    def _image_context(self, pixel_values, image_crops, image_context, vision_features) -> ImageContext | None:
        """The one place image inputs are resolved: pixels (encoded here), a ready `ImageContext` or cached encoder
        features become one ImageContext of this model's decoder, on its device; None without images."""
        given = [name for name, value in [("pixel_values", pixel_values), ("image_context", image_context),
                                          ("vision_features", vision_features)] if value is not None]
        if len(given) > 1:
            raise ValueError(f"Pass either pixel_values or image_context or vision_features, not "
                             f"{' and '.join(given)}.")
        if pixel_values is not None:
            return self.encode_images(pixel_values, image_crops)
        if vision_features is not None:
            return self.context_from_features(vision_features, image_crops)
        if image_context is None:
            return None
        if not isinstance(image_context, ImageContext):
            raise TypeError(
                f"image_context must be the ImageContext that model.encode_images() returns, got "
                f"{type(image_context).__name__}."
            )
        if image_context.decoder != self.config.decoder:
            raise ValueError(
                f"This image_context was encoded for the {image_context.decoder!r} decoder; this model runs "
                f"{self.config.decoder!r}. Encode the images with this model's encode_images()."
            )
        if image_crops is not None:
            raise ValueError("image_crops go with pixel_values or vision_features; an image_context carries its "
                             "own crops. Drop image_crops.")
        return image_context.to(self.get_input_embeddings().weight.device)

    def _run(
        self,
        inputs: DecoderInputs,
        cache: KVCache | None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
        return_logits: bool = True,
    ) -> LeanVLMOutput:
        hidden, states = run_decoder(
            self.language_model,
            self.decoder,
            inputs,
            cache,
            gradient_checkpointing=self.gradient_checkpointing and self.training,
            output_hidden_states=output_hidden_states,
        )
        loss = None
        if inputs.labels is not None:
            # lm_head only where a next token is scored (never on vision rows): the full logits of a vanilla
            # sequence would dominate a training step's time and memory.
            targets = inputs.labels[:, 1:]
            # a prompt's first token has nothing before it to be predicted from (a padding row is no context)
            scored = (targets != IGNORE_INDEX) & inputs.valid[:, :-1]
            scored_logits = self.language_model.lm_head(hidden[:, :-1][scored])
            loss = F.cross_entropy(scored_logits.float(), targets[scored], reduction="sum") / scored.sum().clamp(min=1)
        logits = None
        if return_logits:
            logits = self.language_model.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return LeanVLMOutput(
            loss=loss,
            logits=logits,
            cache=cache,
            attention_mask=inputs.valid,
            hidden_states=states,
            vision_mask=inputs.vision_mask,
        )

    def _prefill_inputs(self, input_ids, valid, image_context: ImageContext | None, labels) -> DecoderInputs:
        num_images = len(image_context) if image_context is not None else 0
        images = assign_images(input_ids, valid, self.config.image_token_id, num_images)
        inputs = self.decoder.build_inputs(
            self.get_input_embeddings(), input_ids, valid, self.config.image_token_id, images, image_context, labels
        )
        empty = (~inputs.valid.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"Sample(s) {empty} have no tokens for the decoder to read"
                + ("." if DECODERS[self.config.decoder].keeps_vision_tokens else
                   f" (with {self.config.decoder}, a prompt needs at least one text token besides <image>, e.g. BOS).")
            )
        return inputs

    def _check_continuation(self, input_ids, images, labels, cache: DecoderCache) -> None:
        if any(image is not None for image in images) or (input_ids == self.config.image_token_id).any():
            raise ValueError("Images can only be given with the first forward of a cache (the prefill).")
        if labels is not None:
            raise ValueError("labels need the whole sequence: compute the loss in one forward, without a cache.")
        if input_ids.shape[0] != cache.batch_size:
            raise ValueError(f"The cache holds {cache.batch_size} sample(s) but input_ids has {input_ids.shape[0]}.")

    def _continuation_inputs(self, input_ids, valid, cache: DecoderCache) -> DecoderInputs:
        embeds = self.get_input_embeddings()(input_ids)
        return DecoderInputs(embeds, positions_from_valid(valid, cache.next_position), valid)

    def decode_step(self, tokens: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """One generation step for every sample: tokens (B,) -> next-token logits (B, vocab). No input checks."""
        valid = torch.ones_like(tokens[:, None], dtype=torch.bool)
        inputs = self._continuation_inputs(tokens[:, None], valid, cache)
        return self._run(inputs, cache, logits_to_keep=1).logits[:, -1]

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_context=None, image_crops=None,
                 **kwargs):
        """Batched generation with a KV cache; returns prompt + new tokens (see `leanvlm.generation.generate`;
        `leanvlm.generation.generate_steps` yields the new tokens step by step)."""
        return generation.generate(self, input_ids, attention_mask, pixel_values, image_context,
                                   image_crops=image_crops, **kwargs)


def _valid_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, length) tensor of token ids, got {shape}.")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}."
        )
    return attention_mask.bool()


def _check_labels(labels: torch.Tensor | None, input_ids: torch.Tensor, logits_to_keep: int) -> None:
    if labels is None:
        return
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}.")
    if logits_to_keep:
        raise ValueError("labels need logits for every position; do not combine them with logits_to_keep.")


def check_weight_files(directory: str) -> None:
    """Every safetensors file in `directory` has a readable header that covers the whole file; a truncated or
    corrupt one is an error naming it (safetensors' own error does not say which file)."""
    from safetensors import SafetensorError, safe_open

    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            path = os.path.join(directory, name)
            try:
                with safe_open(path, framework="pt"):
                    pass
            except (SafetensorError, OSError) as exc:
                raise ValueError(f"{path} is truncated or corrupt ({exc}); save the model again or restore the "
                                 "file.") from exc


def _existing_dir(path, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} directory {str(path)!r} does not exist.")
    return str(path)


def _load_language_model(part, dtype) -> PreTrainedModel:
    if isinstance(part, str) and part in PARTS:  # a packaged pretrained part, converted once into the cache
        part = pretrained_part(part)
    if isinstance(part, PreTrainedConfig):
        check_supported_text_config(part)
        return AutoModelForCausalLM.from_config(part)
    if isinstance(part, (str, os.PathLike)):
        path = _existing_dir(part, "Language model")
        check_supported_text_config(AutoConfig.from_pretrained(path))
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if isinstance(part, PreTrainedModel):
        check_supported_text_config(part.config)
        if not hasattr(part, "lm_head"):
            raise ValueError(
                f"{type(part).__name__} has no language-model head; pass the causal LM (e.g. LlamaForCausalLM)."
            )
        return part
    raise TypeError(f"language_model must be a model, a local directory or a config, got {type(part).__name__}.")


def load_vision_model(part, dtype=None) -> PreTrainedModel:
    """A vision encoder from a model object, a local directory, a config (random init) or a packaged part name."""
    if isinstance(part, str) and part in PARTS:
        part = pretrained_part(part)
    if isinstance(part, PreTrainedConfig):
        return AutoModel.from_config(getattr(part, "vision_config", None) or part)
    if isinstance(part, (str, os.PathLike)):
        path = _existing_dir(part, "Vision model")
        config = AutoConfig.from_pretrained(path)
        if hasattr(config, "vision_config"):  # a full CLIP/SigLIP checkpoint: load its vision tower only
            from transformers.models.auto.modeling_auto import MODEL_MAPPING

            return MODEL_MAPPING[type(config.vision_config)].from_pretrained(path, dtype=dtype)
        return AutoModel.from_pretrained(path, dtype=dtype)
    if isinstance(part, PreTrainedModel):
        if hasattr(part.config, "vision_config"):
            raise ValueError(
                f"{type(part).__name__} is a two-tower model; pass its vision model (e.g. CLIPVisionModel, "
                "SiglipVisionModel) or the checkpoint directory."
            )
        return part
    raise TypeError(f"vision_model must be a model, a local directory or a config, got {type(part).__name__}.")
