"""Import a checkpoint saved by the released ProxyV code (a LLaVA-NeXT fork) as a leanvlm ProxyV model.

The checkpoint is one `LlavaLlamaForCausalLM` / `LlavaQwenForCausalLM` state dict (safetensors or `.bin`, possibly
sharded) with its config.json: the LLM's own keys, the projector, the crop newline, one VisionMLP per layer from
`proxyv_start_layer` on, the learned-proxy initializer when `learn_proxy` is set, and the encoder under LLaVA's
wrapper names. The config names the encoder only by its hub id (`mm_vision_tower`), so the encoder's config comes
from a local directory (`vision_config`). Widths are read from the tensors, not the config: the released code
builds the learned initializer at d/4 whatever the config says. The tensors become the model's parameters without a
copy, in the dtype of most of them (`one_dtype`). The alignment stage's `mm_projector.bin` alone (no LLM, no
encoder) is refused with what to import instead.

Layout differences kept as they are: leanvlm puts each crop's newline right after that crop, where the released code
gives sub-crop newlines positions off by one crop (`NEWLINE_NOTE`).
"""

from __future__ import annotations

import os

from leanvlm.interop.checkpoints import (
    load_part,
    load_strict,
    one_dtype,
    read_json,
    read_weights,
    rename,
    save_imported,
    weight_files,
)

# Released key -> key in leanvlm's ProxyV decoder (`model.decoder`).
DECODER_KEYS = {
    r"model\.mm_projector\.0\.(weight|bias)": "connector.linear_1.{0}",
    r"model\.mm_projector\.2\.(weight|bias)": "connector.linear_2.{0}",
    r"model\.image_newline": "image_newline",
    r"model\.vision_mlp_layers\.(\d+)\.input_proj\.weight": "vision_mlps.{0}.input_proj.weight",
    r"model\.vision_mlp_layers\.(\d+)\.context_proj\.weight": "vision_mlps.{0}.proxy_proj.weight",
    r"model\.vision_mlp_layers\.(\d+)\.proj\.0\.weight": "vision_mlps.{0}.fc1.weight",
    r"model\.vision_mlp_layers\.(\d+)\.proj\.2\.weight": "vision_mlps.{0}.fc2.weight",
    r"model\.vision_mlp_layers\.(\d+)\.layernorm_post\.weight": "vision_mlps.{0}.norm.weight",
    r"model\.proxyv_initializer\.proxyv_tokens": "proxy_init.queries",
    r"model\.proxyv_initializer\.Wk\.weight": "proxy_init.key_proj.weight",
}
# The encoder under LLaVA's wrapper -> the encoder model's own keys.
VISION_KEYS = {r"model\.vision_tower\.vision_tower\.(.+)": "{0}"}
# The LLaVA model type -> the LLM family whose config and weights it extends.
LLM_TYPES = {"llava_llama": "llama", "llava_qwen": "qwen2", "llava_mistral": "mistral"}
SELECT = {"patch": "patch", "cls_patch": "full"}
NEWLINE_NOTE = ("Crop newlines: leanvlm places each crop's newline right after that crop; the released code gives "
                "the sub-crops' newlines positions off by one crop. The weights are kept as they are; multi-crop "
                "answers may differ slightly from the released code's.")


def text_config_of(config: dict) -> dict:
    """The LLM's config inside a LLaVA config: its family's fields only, so no LLaVA or ProxyV setting is carried
    into leanvlm's text_config."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if model_type not in LLM_TYPES:
        raise ValueError(f"model_type {model_type!r}: a ProxyV checkpoint is one of {', '.join(LLM_TYPES)}.")
    family = LLM_TYPES[model_type]
    fields = set(AutoConfig.for_model(family).to_dict()) | {"rope_theta", "rope_scaling"}
    fields -= {"model_type", "architectures", "_name_or_path", "transformers_version"}
    return {"model_type": family, **{k: v for k, v in config.items() if k in fields}}


def load_proxyv(src: str, vision_config: str | None) -> tuple:
    """(leanvlm ProxyV model, tokenizer, what was set and notes) of the released ProxyV checkpoint in `src`, the
    encoder's config from the directory or config.json `vision_config`."""
    from transformers import AutoTokenizer

    from leanvlm.modeling import LeanVLMForConditionalGeneration

    config = read_json(os.path.join(src, "config.json"))
    if not config.get("proxyv"):
        raise ValueError(f"{src}/config.json has no 'proxyv': true; this is not a ProxyV checkpoint.")
    if not isinstance(config.get("proxyv_start_layer"), int):
        raise ValueError(f"{src}/config.json has no proxyv_start_layer; the released code always writes it, so the "
                         "file is not a complete ProxyV config.")
    if not weight_files(src) and os.path.isfile(os.path.join(src, "mm_projector.bin")):
        raise ValueError(f"{src} holds only mm_projector.bin, what the released code's alignment stage saves (the "
                         "projector, newline, VisionMLPs and proxy initializer, without the LLM and the encoder). "
                         "Import the directory its fine-tuning stage saves, which holds the whole model.")
    if vision_config is None:
        raise ValueError(f"The checkpoint names its encoder only as {config.get('mm_vision_tower')!r}; pass that "
                         "encoder's config (a local model directory or its config.json) as vision_config "
                         "(--vision-config).")
    vision_path = vision_config if vision_config.endswith(".json") else os.path.join(vision_config, "config.json")
    state = read_weights(src)
    dtype, dtype_note = one_dtype(state)
    rest, decoder_state = rename(state, DECODER_KEYS)
    llm_state, vision_state = rename(rest, VISION_KEYS)
    llm = load_part(text_config_of(config), llm_state, causal_lm=True, what="language model", dtype=dtype)
    vision = load_part(read_json(vision_path), vision_state, causal_lm=False, what="vision tower", dtype=dtype)
    select = config.get("mm_vision_select_feature", "patch")
    if select not in SELECT:
        raise ValueError(f"mm_vision_select_feature={select!r}; the released code uses one of {list(SELECT)}.")
    anyres = "anyres" in str(config.get("image_aspect_ratio", ""))
    mlp = decoder_state.get("vision_mlps.0.input_proj.weight")
    settings = {
        "vision_feature_layer": config.get("mm_vision_select_layer", -2),
        "vision_feature_select": SELECT[select],
        "proxyv_start_layer": config.get("proxyv_start_layer"),
        "proxyv_reduce_factor": config.get("proxyv_reduce_factor", 4),
        "proxyv_proxy_init": "learned" if config.get("learn_proxy") else "spatial",
        "proxyv_mlp_width": int(mlp.shape[0]) if mlp is not None else None,  # from the tensors, not the config
        "max_crops": int(config.get("max_num_image_crops", 1)) if anyres else 1,
        "image_grid_pinpoints": config.get("image_grid_pinpoints") if anyres else None,
        "image_newline": "image_newline" in decoder_state,  # the released code has one per crop, single crops too
    }
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type={config['mm_projector_type']!r}: leanvlm's ProxyV takes mlp2x_gelu.")
    # The LLM's config, not the LLaVA config.json beside the tokenizer: transformers cannot build that one, and
    # reading it raises deprecations for the 4.x fields it carries (rope_scaling)
    tokenizer = AutoTokenizer.from_pretrained(src, config=llm.config)
    model = LeanVLMForConditionalGeneration.from_parts(llm, vision, decoder="proxyv", tokenizer=tokenizer,
                                                       **settings)
    load_strict(model.decoder, decoder_state, "ProxyV modules")
    notes = [note for note in (dtype_note, NEWLINE_NOTE if settings["max_crops"] > 1 else None) if note]
    return model, tokenizer, {**settings, "notes": notes}


def import_proxyv(src: str, out: str, vision_config: str | None = None) -> dict:
    """Convert the released ProxyV checkpoint in `src` (the encoder's config from the directory or config.json
    `vision_config`) into a saved leanvlm model + processor in `out`; returns what was set and what differs."""
    model, tokenizer, report = load_proxyv(src, vision_config)
    image_processor_dir = None if vision_config.endswith(".json") else vision_config
    template = save_imported(model, tokenizer, image_processor_dir, out)
    return {**report, "template": template, "files": sorted(os.listdir(out))}
