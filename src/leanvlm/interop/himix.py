"""Import a checkpoint saved by the released HiMix code (a TinyLLaVA Factory fork) as a leanvlm HiMix model.

The released code saves a run in one of two ways:
- staged: `language_model/` (the LLM with each layer's extra vision norm and K/V projections) and `vision_tower/`
  (the encoder), each a config.json and weights, beside a top-level TinyLLaVA config.json and the tokenizer;
- whole: one state dict (possibly sharded) with `language_model.` and `vision_tower._vision_tower.` prefixes, whose
  config.json carries `text_config` and `vision_config`.

Weights are read through safetensors, or from `.bin` pickles with `torch.load(weights_only=True)`, and become the
model's parameters without a copy, in the dtype of most of them (`one_dtype`). The key names that differ from
leanvlm's are the table `LAYER_KEYS`; every key the table and the two HF models do not take, and every key they
need but the checkpoint lacks, is an error that names it.
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
)

# A released LLM key of decoder layer n -> the key in leanvlm's HiMix decoder (`model.decoder`).
LAYER_KEYS = {
    r"model\.layers\.(\d+)\.input_layernorm_img\.weight": "vision_kv.{0}.norm.weight",
    r"model\.layers\.(\d+)\.self_attn\.k_proj_img\.(weight|bias)": "vision_kv.{0}.k_proj.{1}",
    r"model\.layers\.(\d+)\.self_attn\.v_proj_img\.(weight|bias)": "vision_kv.{0}.v_proj.{1}",
}
# The whole-model state dict's prefixes -> which part they belong to.
WHOLE_PREFIXES = {"language_model.": "language", "vision_tower._vision_tower.": "vision"}
# TinyLLaVA's token selection -> leanvlm's: its "patch" drops token 0 (728 of SigLIP-384's 729 tokens).
SELECT = {"patch": "drop_first", "cls_patch": "full"}


def read_checkpoint(src: str) -> tuple[dict, dict, dict, dict, dict]:
    """(LLM state, encoder state, text config, vision config, TinyLLaVA config) of either saved form."""
    top = read_json(os.path.join(src, "config.json"))
    if os.path.isdir(os.path.join(src, "language_model")):
        language = os.path.join(src, "language_model")
        vision = os.path.join(src, "vision_tower")
        return (read_weights(language), read_weights(vision), read_json(os.path.join(language, "config.json")),
                read_json(os.path.join(vision, "config.json")), top)
    parts = {"language": {}, "vision": {}}
    for key, value in read_weights(src).items():
        prefix = next((p for p in WHOLE_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"{src}: key {key!r} belongs to neither the language model nor the vision tower "
                             f"(expected the prefixes {', '.join(WHOLE_PREFIXES)}).")
        parts[WHOLE_PREFIXES[prefix]][key[len(prefix):]] = value
    for field in ("text_config", "vision_config"):
        if not isinstance(top.get(field), dict):
            raise ValueError(f"{src}/config.json has no {field}; a whole-model HiMix checkpoint needs both.")
    return parts["language"], parts["vision"], top["text_config"], top["vision_config"], top


def load_himix(src: str) -> tuple:
    """(leanvlm HiMix model, tokenizer, what was set) of the released HiMix checkpoint in `src`."""
    from transformers import AutoTokenizer

    from leanvlm.modeling import LeanVLMForConditionalGeneration

    llm_state, vision_state, text_config, vision_config, top = read_checkpoint(src)
    dtype, dtype_note = one_dtype(llm_state, vision_state)
    plain, decoder_state = rename(llm_state, LAYER_KEYS)
    if not decoder_state:
        raise ValueError(f"{src}: no layer has input_layernorm_img / k_proj_img / v_proj_img; this is not a HiMix "
                         "checkpoint.")
    llm = load_part(text_config, plain, causal_lm=True, what="language model", dtype=dtype)
    vision = load_part(vision_config, vision_state, causal_lm=False, what="vision tower", dtype=dtype)
    tokenizer_dir = src if os.path.isfile(os.path.join(src, "tokenizer_config.json")) else os.path.join(
        src, "language_model")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    select = top.get("vision_feature_select_strategy", "patch")
    if select not in SELECT:
        raise ValueError(f"vision_feature_select_strategy={select!r}; the released code uses one of {list(SELECT)}.")
    settings = {"vision_feature_layer": top.get("vision_feature_layer", -2), "vision_feature_select": SELECT[select]}
    model = LeanVLMForConditionalGeneration.from_parts(llm, vision, decoder="himix", tokenizer=tokenizer, **settings)
    load_strict(model.decoder, decoder_state, "HiMix vision K/V layers")
    notes = [dtype_note] if dtype_note else []
    return model, tokenizer, {**settings, "layers": len(model.decoder.vision_kv), "notes": notes}


def import_himix(src: str, out: str) -> dict:
    """Convert the released HiMix checkpoint in `src` into a saved leanvlm model + processor in `out`; returns what
    was set, notes and the files written."""
    model, tokenizer, report = load_himix(src)
    template = save_imported(model, tokenizer, os.path.join(src, "vision_tower"), out)
    return {**report, "template": template, "files": sorted(os.listdir(out))}
