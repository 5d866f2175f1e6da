"""`leanvlm import --from himix`: synthetic checkpoints in the released code's two layouts (tiny random weights, its
real key names and config fields, written here by hand) import to a model whose logits equal the model they were
written from, and survive save/reload; keys the table does not map, or that are missing, are named. The model is
built in the checkpoint's dtype from the checkpoint's own tensors, nothing left on the meta device."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from tiny import bpe_tokenizer, left_padded, pixels, text_config, vision_config
from typer.testing import CliRunner

from leanvlm import LeanVLMForConditionalGeneration
from leanvlm.cli import app
from leanvlm.interop.himix import import_himix, load_himix


@pytest.fixture(scope="module")
def reference():
    """A HiMix model as the released code builds it: Qwen2 (biases on k/v, so on the vision K/V too), SigLIP read
    at hidden state -2 with token 0 dropped."""
    torch.manual_seed(0)
    model = LeanVLMForConditionalGeneration.from_parts(
        language_model=text_config("qwen2"), vision_model=vision_config("siglip"), decoder="himix",
        tokenizer=bpe_tokenizer(), vision_feature_select="drop_first").eval()
    for kv in model.decoder.vision_kv.values():  # trained-looking values, not the initialisation
        for p in kv.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return model


def released_llm_state(model) -> dict:
    """The LLM's state dict with each layer's vision norm and K/V under the released names."""
    state = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    for n, kv in enumerate(model.decoder.vision_kv.values()):
        state[f"model.layers.{n}.input_layernorm_img.weight"] = kv.norm.weight.detach().clone()
        for name in ("k", "v"):
            projection = getattr(kv, f"{name}_proj")
            state[f"model.layers.{n}.self_attn.{name}_proj_img.weight"] = projection.weight.detach().clone()
            state[f"model.layers.{n}.self_attn.{name}_proj_img.bias"] = projection.bias.detach().clone()
    return state


def tinyllava_config(model, **extra) -> dict:
    return {"model_type": "tinyllava", "vision_feature_layer": -2, "vision_feature_select_strategy": "patch",
            "image_token_index": -200, "tokenizer_padding_side": "right", **extra}


def write_staged(model, root):
    """After alignment: language_model/ and vision_tower/ as pickled .bin files with configs, tokenizer on top."""
    for part, state, config in (("language_model", released_llm_state(model), model.config.text_config),
                                ("vision_tower", model.vision_model.state_dict(), model.config.vision_config)):
        (root / part).mkdir(parents=True)
        torch.save(state, root / part / "pytorch_model.bin")
        (root / part / "config.json").write_text(json.dumps(config.to_dict()))
    (root / "config.json").write_text(json.dumps(tinyllava_config(model)))
    bpe_tokenizer().save_pretrained(root)


def write_whole(model, root):
    """After fine-tuning: one safetensors state dict with the released prefixes."""
    root.mkdir(parents=True)
    state = {f"language_model.{k}": v for k, v in released_llm_state(model).items()}
    state |= {f"vision_tower._vision_tower.{k}": v.clone() for k, v in model.vision_model.state_dict().items()}
    state.pop("language_model.lm_head.weight", None) if model.config.text_config.tie_word_embeddings else None
    save_file({k: v.contiguous() for k, v in state.items()}, root / "model.safetensors")
    config = tinyllava_config(model, text_config=model.config.text_config.to_dict(),
                              vision_config=model.config.vision_config.to_dict())
    (root / "config.json").write_text(json.dumps(config))
    bpe_tokenizer().save_pretrained(root)


def logits(model):
    image = model.config.image_token_id
    ids, mask = left_padded([[5, image, 7, 8, 9], [11, image, 12, 13]])
    with torch.no_grad():
        return model(ids, mask, pixel_values=pixels(2)).logits


@pytest.mark.parametrize("layout", [write_staged, write_whole])
def test_both_released_layouts_import_to_the_same_model_and_reload(reference, tmp_path, layout):
    layout(reference, tmp_path / "released")
    result = CliRunner().invoke(app, ["import", "--from", "himix", str(tmp_path / "released"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    imported = LeanVLMForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert imported.config.decoder == "himix" and imported.config.vision_feature_select == "drop_first"
    assert imported.encode_images(pixels(1)).tokens.shape[-2] == 15  # 16 patches, token 0 dropped as released
    torch.testing.assert_close(logits(imported), logits(reference), atol=0, rtol=0)
    imported.save_pretrained(tmp_path / "again")
    torch.testing.assert_close(logits(LeanVLMForConditionalGeneration.from_pretrained(tmp_path / "again")),
                               logits(reference), atol=0, rtol=0)


def test_unmapped_and_missing_keys_are_named(reference, tmp_path):
    write_staged(reference, tmp_path / "extra")
    state = torch.load(tmp_path / "extra" / "language_model" / "pytorch_model.bin", weights_only=True)
    state["model.layers.0.self_attn.q_proj_img.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "extra" / "language_model" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"has keys leanvlm does not map: model\.layers\.0\.self_attn\.q_proj_img"):
        import_himix(str(tmp_path / "extra"), str(tmp_path / "out"))
    del state["model.layers.0.self_attn.q_proj_img.weight"], state["model.layers.1.self_attn.v_proj_img.bias"]
    torch.save(state, tmp_path / "extra" / "language_model" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"HiMix vision K/V layers lacks: vision_kv\.1\.v_proj\.bias"):
        import_himix(str(tmp_path / "extra"), str(tmp_path / "out"))


def test_a_pickle_that_is_more_than_tensors_is_refused(reference, tmp_path):
    write_staged(reference, tmp_path / "released")
    torch.save({"weights": object()}, tmp_path / "released" / "vision_tower" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"vision_tower/pytorch_model\.bin cannot be read safely"):
        import_himix(str(tmp_path / "released"), str(tmp_path / "out"))


def test_the_model_is_built_in_the_checkpoint_dtype_with_nothing_left_on_meta(reference, tmp_path):
    write_whole(copy.deepcopy(reference).to(torch.bfloat16), tmp_path / "released")
    model, _, report = load_himix(str(tmp_path / "released"))
    assert report["notes"] == []
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert [name for name, tensor in tensors.items() if tensor.is_meta] == []
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # buffers the checkpoint does not hold (rotary inv_freq, the encoder's position ids) are computed as usual
    buffers = dict(reference.named_buffers())
    assert set(dict(model.named_buffers())) == set(buffers)
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, buffers[name], atol=0, rtol=0)
    with torch.no_grad():
        assert logits(model).dtype == torch.bfloat16


def test_mixed_float_dtypes_are_cast_to_the_dtype_of_most_weights_with_a_note(reference, tmp_path):
    write_staged(reference, tmp_path / "released")  # float32; the LLM, the larger part, goes to bfloat16
    path = tmp_path / "released" / "language_model" / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, path)
    result = CliRunner().invoke(app, ["import", "--from", "himix", str(tmp_path / "released"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    vision_tensors = len(reference.vision_model.state_dict())
    assert f"{vision_tensors} tensors were cast to bfloat16" in " ".join(result.output.split())
    imported = LeanVLMForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert {p.dtype for p in imported.parameters()} == {torch.bfloat16}
