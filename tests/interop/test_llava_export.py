"""`leanvlm export --to llava`: plain transformers loads the checkpoint and its processor, the processor's chat
template asks what `leanvlm eval` asks, and logits and greedy answers equal leanvlm's (fp32); models Llava cannot
represent are refused with the reason, before anything is written."""

import pytest
import torch
from PIL import Image
from tiny import bpe_tokenizer, text_config, vision_config
from transformers import AutoProcessor, LlavaForConditionalGeneration
from typer.testing import CliRunner

from leanvlm import LeanVLMForConditionalGeneration, LeanVLMProcessor
from leanvlm.cli import app
from leanvlm.data.templates import generation_prompt
from leanvlm.eval.exact_match import encode_prompts
from leanvlm.interop.llava import export

QUESTION = "What color is the square?"


def saved(tmp_path, vision="siglip", decoder="vanilla", template="chat", **options):
    torch.manual_seed(0)
    tokenizer = bpe_tokenizer()
    model = LeanVLMForConditionalGeneration.from_parts(
        language_model=text_config("llama"), vision_model=vision_config(vision), decoder=decoder,
        tokenizer=tokenizer, **options).eval()
    processor = LeanVLMProcessor.for_model(model, tokenizer)
    processor.template = template
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    return model, processor


def collapsed(ids: list[int], image_id: int) -> list[int]:
    """Llava's prompt with each image's run of placeholders back to one, as leanvlm writes it."""
    return [t for i, t in enumerate(ids) if t != image_id or i == 0 or ids[i - 1] != image_id]


@pytest.mark.parametrize("vision", ["siglip", "clip", "dinov2"])
def test_plain_transformers_runs_the_export_with_leanvlms_prompts_logits_and_answers(tmp_path, vision):
    model, processor = saved(tmp_path, vision)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "model"), "--to", "llava", str(tmp_path / "llava")])
    assert result.exit_code == 0, result.output
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    llava_processor = AutoProcessor.from_pretrained(tmp_path / "llava")
    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (20, 50), "blue")]
    chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
             [{"role": "user", "content": [{"type": "text", "text": "Hello"}]},
              {"role": "assistant", "content": "red"},
              {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]]
    for chat, image in zip(chats, images, strict=True):
        prompt = llava_processor.apply_chat_template(chat, add_generation_prompt=True)
        batch = llava_processor(images=[image], text=[prompt], return_tensors="pt")
        ours = [{**m, "content": m["content"] if isinstance(m["content"], str) else
                 "\n".join(["<image>"] * any(p["type"] == "image" for p in m["content"]) +
                           [p["text"] for p in m["content"] if p["type"] == "text"])} for m in chat]
        ids = encode_prompts(processor, [generation_prompt(ours, "chat", processor.tokenizer)])[0]
        assert collapsed(batch["input_ids"][0].tolist(), llava.config.image_token_id) == ids[0].tolist()
        pixel_values, crops = processor.preprocess_images([image])
        assert torch.equal(batch["pixel_values"], pixel_values)  # the same preprocessing
        with torch.no_grad():
            expected = model(ids, pixel_values=pixel_values, image_crops=crops).logits
            got = llava(**batch).logits
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            answer = llava.generate(**batch, max_new_tokens=5, do_sample=False)[0, batch["input_ids"].shape[1]:]
            mine = model.generate(ids, pixel_values=pixel_values, image_crops=crops, max_new_tokens=5)[0, ids.shape[1]:]
        assert answer.tolist() == mine[: len(answer)].tolist()


@pytest.mark.parametrize("decoder,options,template,reason", [
    ("himix", {}, "chat", "no Hugging Face class represents its decoder"),
    ("proxyv", {}, "chat", "no Hugging Face class represents its decoder"),
    ("vanilla", {"max_crops": 3}, "chat", "the layouts differ"),
    ("vanilla", {"connector_type": "linear"}, "chat", "Llava's projector is the 2-layer MLP"),
    ("vanilla", {"probe_skip_vision_ffn_from_layer": 1}, "chat", "without frozen layers or redundancy probes"),
    ("vanilla", {"frozen_vision_layers": [1]}, "chat", "frozen_vision_layers: Llava runs every vision token"),
    ("pool", {"keep_tokens": 4}, "chat", "no Hugging Face class represents its decoder"),
    ("vanilla", {"tome_r": 2}, "chat", "Llava runs the encoder without token merging"),
    ("vanilla", {"image_newline": True}, "chat", "no newline embedding after a single-crop image"),
    ("vanilla", {}, "vicuna_v1", "trained with the 'vicuna_v1' template"),
])
def test_what_llava_cannot_represent_is_refused_with_the_reason_and_nothing_written(tmp_path, decoder, options,
                                                                                  template, reason):
    saved(tmp_path, "clip", decoder, template, **options)
    with pytest.raises(ValueError, match=reason):
        export(str(tmp_path / "model"), str(tmp_path / "llava"))
    assert not (tmp_path / "llava").exists()
    result = CliRunner().invoke(app, ["export", str(tmp_path / "model"), "--to", "llava", str(tmp_path / "out")])
    assert result.exit_code != 0 and "Cannot export to Llava" in result.output


def test_an_unknown_target_is_named(tmp_path):
    saved(tmp_path)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "model"), "--to", "gguf", str(tmp_path / "out")])
    assert result.exit_code != 0 and "llava" in result.output


def test_the_packaged_parts_export_with_their_own_chat_template():
    """SmolLM2-135M-Instruct (49,152 tokens + `<image>`, tied embeddings, its own chat template) + DINOv2-S/14."""
    from leanvlm.interop.llava import to_llava
    from leanvlm.serve.loadtest import LoadSettings, build_model

    model, processor = build_model(LoadSettings(dtype="float32"), "vanilla")
    llava, llava_processor = to_llava(model, processor)
    image = Image.new("RGB", (64, 48), "red")
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = llava_processor.apply_chat_template(chat, add_generation_prompt=True)
    batch = llava_processor(images=[image], text=[prompt], return_tensors="pt")
    ids = encode_prompts(processor, [generation_prompt([{"role": "user", "content": f"<image>\n{QUESTION}"}], "chat",
                                                       processor.tokenizer)])[0]
    assert collapsed(batch["input_ids"][0].tolist(), llava.config.image_token_id) == ids[0].tolist()
    pixel_values, crops = processor.preprocess_images([image])
    with torch.no_grad():
        expected = model(ids, pixel_values=pixel_values, image_crops=crops).logits
        torch.testing.assert_close(llava(**batch).logits, expected, atol=1e-5, rtol=0)
