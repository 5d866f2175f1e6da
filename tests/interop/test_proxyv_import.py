"""`leanvlm import --from proxyv`: a synthetic checkpoint in the released code's LLaVA-NeXT layout (tiny random
weights, its real key names and config fields, written here by hand) imports to a model whose logits equal the
model it was written from, with the spatial and the learned proxies, also from a transformers 4.x config; the
crop-newline difference is reported. The model is built in the checkpoint's dtype from the checkpoint's own tensors
(tied embeddings tied again), nothing left on the meta device; the alignment stage's mm_projector.bin alone is
refused with what to import instead."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny import bpe_tokenizer, left_padded, pixels, text_config, vision_config
from typer.testing import CliRunner

from leanvlm import LeanVLMForConditionalGeneration
from leanvlm.cli import app
from leanvlm.interop.proxyv import import_proxyv, load_proxyv

PINPOINTS = [[32, 64], [64, 32]]


def reference(learned: bool, text=None):
    torch.manual_seed(0)
    model = LeanVLMForConditionalGeneration.from_parts(
        language_model=text or text_config("llama"), vision_model=vision_config("clip"), decoder="proxyv",
        tokenizer=bpe_tokenizer(), proxyv_start_layer=1, proxyv_reduce_factor=2, image_newline=True,
        proxyv_proxy_init="learned" if learned else "spatial", max_crops=3, image_grid_pinpoints=PINPOINTS).eval()
    for p in model.decoder.parameters():  # trained-looking values, not the initialisation
        torch.nn.init.normal_(p, std=0.3)
    return model


def write_released(model, root, learned: bool):
    """One LlavaLlamaForCausalLM state dict with the released names, its config.json, the tokenizer; the encoder's
    config in its own directory, as users have it from the hub."""
    root.mkdir(parents=True)
    decoder = model.decoder
    state = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    state |= {f"model.vision_tower.vision_tower.{k}": v.clone() for k, v in model.vision_model.state_dict().items()}
    state["model.mm_projector.0.weight"] = decoder.connector.linear_1.weight
    state["model.mm_projector.0.bias"] = decoder.connector.linear_1.bias
    state["model.mm_projector.2.weight"] = decoder.connector.linear_2.weight
    state["model.mm_projector.2.bias"] = decoder.connector.linear_2.bias
    state["model.image_newline"] = decoder.image_newline
    for m, mlp in enumerate(decoder.vision_mlps):
        state[f"model.vision_mlp_layers.{m}.input_proj.weight"] = mlp.input_proj.weight
        state[f"model.vision_mlp_layers.{m}.context_proj.weight"] = mlp.proxy_proj.weight
        state[f"model.vision_mlp_layers.{m}.proj.0.weight"] = mlp.fc1.weight
        state[f"model.vision_mlp_layers.{m}.proj.2.weight"] = mlp.fc2.weight
        state[f"model.vision_mlp_layers.{m}.layernorm_post.weight"] = mlp.norm.weight
    if learned:
        state["model.proxyv_initializer.proxyv_tokens"] = decoder.proxy_init.queries
        state["model.proxyv_initializer.Wk.weight"] = decoder.proxy_init.key_proj.weight
    save_file({k: v.detach().contiguous() for k, v in state.items()}, root / "model.safetensors")
    config = {**model.config.text_config.to_dict(), "model_type": "llava_llama", "architectures":
              ["LlavaLlamaForCausalLM"], "proxyv": True, "proxyv_start_layer": 1, "proxyv_reduce_factor": 2,
              "learn_proxy": learned, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu",
              "mm_hidden_size": 24, "image_aspect_ratio": "anyres", "max_num_image_crops": 3,
              "image_grid_pinpoints": PINPOINTS, "mm_patch_merge_type": "flat", "per_crop_token_len": 16}
    (root / "config.json").write_text(json.dumps(config))
    bpe_tokenizer().save_pretrained(root)
    (root.parent / "clip").mkdir()
    (root.parent / "clip" / "config.json").write_text(json.dumps(model.config.vision_config.to_dict()))


def logits(model):
    image = model.config.image_token_id
    ids, mask = left_padded([[5, image, 7, 8, 9], [11, image, 12, 13]])
    with torch.no_grad():
        return model(ids, mask, pixel_values=pixels(5), image_crops=torch.tensor([3, 2])).logits


@pytest.mark.parametrize("learned", [False, True])
def test_the_released_layout_imports_to_the_same_model(tmp_path, learned):
    model = reference(learned)
    write_released(model, tmp_path / "released", learned)
    result = CliRunner().invoke(app, ["import", "--from", "proxyv", str(tmp_path / "released"), str(tmp_path / "out"),
                                      "--vision-config", str(tmp_path / "clip")])
    assert result.exit_code == 0, result.output
    assert "off by one crop" in result.output
    imported = LeanVLMForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    config = imported.config
    assert (config.decoder, config.proxyv_start_layer, config.proxyv_reduce_factor, config.max_crops) == (
        "proxyv", 1, 2, 3)
    assert config.proxyv_proxy_init == ("learned" if learned else "spatial") and config.image_newline is True
    torch.testing.assert_close(logits(imported), logits(model), atol=0, rtol=0)


def test_the_encoder_config_is_required_and_wrong_widths_are_named(tmp_path):
    model = reference(learned=True)
    write_released(model, tmp_path / "released", learned=True)
    with pytest.raises(ValueError, match=r"openai/clip-vit-large-patch14-336.*--vision-config"):
        import_proxyv(str(tmp_path / "released"), str(tmp_path / "out"))
    from safetensors.torch import load_file

    state = load_file(tmp_path / "released" / "model.safetensors")
    state["model.proxyv_initializer.Wk.weight"] = torch.zeros(8, 32)  # d/4 where the MLPs use d/2
    save_file(state, tmp_path / "released" / "model.safetensors")
    with pytest.raises(ValueError, match=r"(?s)ProxyV modules do not fit.*proxy_init\.key_proj\.weight"):
        import_proxyv(str(tmp_path / "released"), str(tmp_path / "out"), str(tmp_path / "clip"))


def test_a_transformers_4_config_imports_to_the_same_model(tmp_path):
    text = text_config("llama")
    text.rope_parameters["rope_theta"] = 500.0  # not the default, so a theta left behind changes the logits
    model = reference(learned=False, text=text)
    write_released(model, tmp_path / "released", learned=False)
    path = tmp_path / "released" / "config.json"
    config = json.loads(path.read_text())
    del config["rope_parameters"], config["dtype"]
    config |= {"rope_theta": 500.0, "rope_scaling": None, "torch_dtype": "float32", "transformers_version": "4.45.2"}
    path.write_text(json.dumps(config))
    import_proxyv(str(tmp_path / "released"), str(tmp_path / "out"), str(tmp_path / "clip"))
    imported = LeanVLMForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert imported.config.text_config.rope_parameters["rope_theta"] == 500.0
    torch.testing.assert_close(logits(imported), logits(model), atol=0, rtol=0)


def test_the_model_is_built_in_the_checkpoint_dtype_with_nothing_left_on_meta(tmp_path):
    model = reference(learned=True, text=text_config("llama3"))  # tied word embeddings: no lm_head in the file
    write_released(model.to(torch.bfloat16), tmp_path / "released", learned=True)
    imported, _, report = load_proxyv(str(tmp_path / "released"), str(tmp_path / "clip"))
    assert not any("dtype" in note for note in report["notes"])
    tensors = dict(imported.named_parameters()) | dict(imported.named_buffers())
    assert [name for name, tensor in tensors.items() if tensor.is_meta] == []
    assert {p.dtype for p in imported.parameters()} == {torch.bfloat16}
    llm = imported.language_model
    assert llm.lm_head.weight is llm.get_input_embeddings().weight
    buffers = dict(reference(learned=True, text=text_config("llama3")).named_buffers())
    for name, buffer in imported.named_buffers():  # rotary inv_freq, position ids: computed as usual
        torch.testing.assert_close(buffer, buffers[name], atol=0, rtol=0)


def test_the_alignment_stage_projector_alone_is_refused_with_what_to_import(tmp_path):
    model = reference(learned=True)
    write_released(model, tmp_path / "released", learned=True)
    from safetensors.torch import load_file

    state = load_file(tmp_path / "released" / "model.safetensors")
    torch.save({k: v for k, v in state.items() if not k.startswith(("model.layers.", "model.vision_tower.",
                                                                    "model.embed_tokens", "model.norm", "lm_head"))},
               tmp_path / "released" / "mm_projector.bin")
    (tmp_path / "released" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"holds only mm_projector\.bin.*Import the directory its fine-tuning stage"):
        import_proxyv(str(tmp_path / "released"), str(tmp_path / "out"), str(tmp_path / "clip"))
