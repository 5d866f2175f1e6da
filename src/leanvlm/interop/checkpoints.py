"""Reading other projects' checkpoints: JSON configs, weights (safetensors, or pickles with weights_only=True,
sharded or not), one dtype for all of them, renaming keys by a table, strict loading that names every unmapped or
missing key, and Hugging Face parts built from a saved config without memory of their own: the checkpoint's tensors
become their parameters."""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import torch

from leanvlm.reports import listed

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path} not found: not the checkpoint expected.") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}).") from exc


def weight_files(directory: str) -> list[str]:
    """The names of a directory's weight files: model.safetensors or pytorch_model.bin, or their sharded index's
    shards; none when it has neither."""
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return [name]
        index = os.path.join(directory, name + ".index.json")
        if os.path.isfile(index):
            return sorted(set(read_json(index)["weight_map"].values()))
    return []


def read_weights(directory: str) -> dict[str, torch.Tensor]:
    """A directory's state dict: model.safetensors or pytorch_model.bin, or their sharded index. Pickles load with
    weights_only=True, so a checkpoint cannot run code."""
    from safetensors.torch import load_file

    files = weight_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory} holds no weights ({' or '.join(WEIGHT_FILES)}, or a sharded index).")
    state = {}
    for name in files:
        path = os.path.join(directory, name)
        try:
            if name.endswith(".safetensors"):
                state.update(load_file(path))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # truncated, corrupt, or a pickle that is more than tensors
            raise ValueError(f"{path} cannot be read safely ({type(exc).__name__}: {str(exc)[:200]}); save it again "
                             "as safetensors or as a plain dict of tensors.") from exc
    return state


def one_dtype(*states: dict) -> tuple[torch.dtype, str | None]:
    """The floating-point dtype holding most of the checkpoint's values, and a note when some tensors had another:
    those are cast to it in place, so the model is built in one dtype (as it would be run). Integer tensors stay."""
    counts = Counter()
    for state in states:
        for value in state.values():
            if value.is_floating_point():
                counts[value.dtype] += value.numel()
    if not counts:
        raise ValueError("The checkpoint holds no floating-point weights.")
    dtype = counts.most_common(1)[0][0]
    cast = []
    for state in states:
        for key, value in state.items():
            if value.is_floating_point() and value.dtype != dtype:
                state[key] = value.to(dtype)
                cast.append(f"{key} ({str(value.dtype).removeprefix('torch.')})")
    if not cast:
        return dtype, None
    shown = listed(cast, 3)
    return dtype, (f"The checkpoint mixes float dtypes; {len(cast)} tensors were cast to "
                   f"{str(dtype).removeprefix('torch.')}, the dtype of most of its weights: {shown}.")


def load_strict(module, state: dict, what: str, allowed_missing: tuple[str, ...] = ()) -> None:
    """Load `state` into `module`, whose parameters become the state's tensors (no copy; meta parameters are filled);
    missing or unexpected keys are an error naming them."""
    try:
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shapes that differ: say which, from torch's own message
        raise ValueError(f"The checkpoint's {what} do not fit leanvlm's: {str(exc)[:600]}") from exc
    missing = [k for k in result.missing_keys if k not in allowed_missing]
    for problem, keys in (("lacks", missing), ("has keys leanvlm does not map", result.unexpected_keys)):
        if keys:
            raise ValueError(f"The checkpoint's {what} {problem}: {listed(keys, 5)}.")


def load_part(config: dict, state: dict, causal_lm: bool, what: str, dtype: torch.dtype):
    """A Hugging Face model built from a saved `config` (a causal LM, or an encoder: a two-tower SigLIP/CLIP
    config gives its vision half) in `dtype`, whose parameters are `state`'s tensors (loaded strictly; a causal LM
    with tied embeddings may lack its lm_head)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"The {what}'s config has no model_type.")
    part = AutoConfig.for_model(model_type, **config)
    # Parameters on the meta device (no memory) until the checkpoint's tensors replace them; buffers the checkpoint
    # does not hold (rotary inv_freq, position ids) are computed on the CPU as usual.
    with init_empty_weights(include_buffers=False):
        if causal_lm:
            model = AutoModelForCausalLM.from_config(part, dtype=dtype)
        else:
            model = AutoModel.from_config(getattr(part, "vision_config", None) or part, dtype=dtype)
    tied = causal_lm and model.config.tie_word_embeddings
    load_strict(model, state, what, ("lm_head.weight",) if tied else ())
    if tied:  # the head still points at the meta embedding that the checkpoint's tensor replaced
        model.tie_weights()
    return model


def rename(state: dict, table: dict[str, str]) -> tuple[dict, dict]:
    """(keys no pattern of `table` matches, keys that match renamed by their pattern's target). The table maps a
    regular expression over the whole key to a target whose {0}, {1}, ... are its groups."""
    rest, renamed = {}, {}
    for key, value in state.items():
        for pattern, target in table.items():
            match = re.fullmatch(pattern, key)
            if match:
                renamed[target.format(*match.groups())] = value
                break
        else:
            rest[key] = value
    return rest, renamed


def save_imported(model, tokenizer, image_processor_dir: str | None, out: str) -> str:
    """Save an imported model with its processor: the encoder's own preprocessing when `image_processor_dir` holds
    one, else the default for its config; the tokenizer's chat template when it has one, else vicuna_v1 (released
    checkpoints do not store their conversation template). Returns the template set."""
    from leanvlm.processing import LeanVLMProcessor, default_image_processor

    if image_processor_dir and os.path.isfile(os.path.join(image_processor_dir, "preprocessor_config.json")):
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(image_processor_dir)
    else:
        image_processor = default_image_processor(model.config.vision_config)
    processor = LeanVLMProcessor.for_model(model, tokenizer, image_processor)
    processor.template = "chat" if getattr(tokenizer, "chat_template", None) else "vicuna_v1"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return processor.template
