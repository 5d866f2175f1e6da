"""Building from parts, saving and loading."""

import pytest
import torch
from PIL import Image
from tiny import bpe_tokenizer, build, left_padded, pixels, prompt, text_config, vision_config
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
)

from leanvlm import LeanVLMForConditionalGeneration, LeanVLMProcessor


def logits(model, images=None):
    ids, mask = left_padded([prompt(model, 5, "<image>", 7, 8), prompt(model, 9, "<image>", 10)])
    with torch.no_grad():
        return model(ids, mask, pixel_values=pixels(2) if images is None else images).logits


@pytest.mark.parametrize("decoder,family", [("vanilla", "llama3"), ("himix", "qwen2"), ("himix", "llama3")])
def test_safetensors_round_trip_gives_identical_logits(tmp_path, decoder, family):
    model = build(decoder, family, himix_feature_layers=[-1, -2] if decoder == "himix" else None)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = LeanVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.decoder == decoder
    assert loaded.config.image_token_id == model.config.image_token_id
    assert loaded.config.himix_feature_layers == model.config.himix_feature_layers
    assert torch.equal(logits(loaded), logits(model))
    for auto_class in (AutoModelForImageTextToText, AutoModelForCausalLM):  # registered by `import leanvlm`
        auto = auto_class.from_pretrained(tmp_path).eval()
        assert isinstance(auto, LeanVLMForConditionalGeneration)
        assert torch.equal(logits(auto), logits(model))


def test_auto_processor_loads_the_saved_processor(tmp_path):
    model = build("himix")
    processor = LeanVLMProcessor.for_model(model, bpe_tokenizer())
    processor.template = "vicuna_v1"
    processor.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, LeanVLMProcessor) and loaded.template == "vicuna_v1"
    image = Image.new("RGB", (20, 30), "red")
    expected, got = processor("<image>\nWhat color?", [image]), loaded("<image>\nWhat color?", [image])
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_parts_from_local_directories_equal_parts_from_objects(tmp_path):
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(text_config("qwen2"))
    clip = CLIPModel(CLIPConfig(text_config=CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                           num_attention_heads=2, vocab_size=50).to_dict(),
                                vision_config=vision_config("clip").to_dict()))
    with pytest.raises(ValueError, match="two-tower"):
        LeanVLMForConditionalGeneration.from_parts(llm, clip)
    llm.save_pretrained(tmp_path / "llm")
    clip.save_pretrained(tmp_path / "clip")  # a full two-tower checkpoint: only its vision tower is loaded
    torch.manual_seed(1)
    from_dirs = LeanVLMForConditionalGeneration.from_parts(tmp_path / "llm", str(tmp_path / "clip"), decoder="himix")
    torch.manual_seed(1)
    from_objects = LeanVLMForConditionalGeneration.from_parts(llm, clip.vision_model, decoder="himix")
    assert type(from_dirs.vision_model).__name__ == "CLIPVisionModel"
    assert torch.equal(logits(from_dirs.eval()), logits(from_objects.eval()))


def test_pretrained_parts_keep_their_weights():
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(text_config("llama"))
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    model = LeanVLMForConditionalGeneration.from_parts(llm, vision_config("siglip"), decoder="himix")
    after = model.language_model.state_dict()
    for name, tensor in before.items():
        if "embed_tokens" in name or "lm_head" in name:  # one row added for <image>
            assert torch.equal(after[name][: tensor.shape[0]], tensor)
        else:
            assert torch.equal(after[name], tensor), name


def test_image_token_comes_from_the_tokenizer_or_is_appended():
    model = build("vanilla")
    vocab = text_config().vocab_size
    assert model.config.image_token_id == vocab  # appended after the vocabulary
    assert model.get_input_embeddings().num_embeddings == vocab + 1

    class Tokenizer:  # the two methods from_parts uses, as a PreTrainedTokenizer has them
        def __init__(self):
            self.vocab = {"a": 0, "<image>": 42}

        def get_vocab(self):
            return self.vocab

        def add_tokens(self, tokens, special_tokens=False):
            for token in tokens:
                self.vocab[str(token)] = len(self.vocab)

        def convert_tokens_to_ids(self, token):
            return self.vocab[token]

    model = LeanVLMForConditionalGeneration.from_parts(text_config(), vision_config(), tokenizer=Tokenizer())
    assert model.config.image_token_id == 42
    assert model.get_input_embeddings().num_embeddings == vocab  # 42 already fits
    tokenizer = Tokenizer()
    del tokenizer.vocab["<image>"]
    model = LeanVLMForConditionalGeneration.from_parts(text_config(), vision_config(), tokenizer=tokenizer)
    assert model.config.image_token_id == 1 and tokenizer.vocab["<image>"] == 1


def test_options_are_config_fields_and_the_encoder_is_frozen_by_default():
    model = build("vanilla", vision="clip", connector_type="linear", vision_feature_layer=-1,
                  vision_feature_select="full")
    assert model.config.connector_type == "linear" and model.config.vision_feature_layer == -1
    assert model.encode_images(pixels(1)).tokens.shape[1] == 17  # CLS kept with "full"
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    trainable = build("vanilla", freeze_vision=False)
    assert all(p.requires_grad for p in trainable.vision_model.parameters())


@pytest.mark.parametrize("vision,tokens", [("siglip", 16), ("clip", 16), ("dinov2", 16)])
def test_patch_select_drops_the_cls_token_only_when_there_is_one(vision, tokens):
    model = build("vanilla", vision=vision)
    assert model.encode_images(pixels(2)).tokens.shape[:2] == (2, tokens)


@pytest.mark.parametrize("decoder", ["vanilla", "himix"])
def test_new_modules_follow_the_llm_dtype_and_mixed_dtypes_generate(decoder):
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(text_config("qwen2")).to(torch.bfloat16)  # as a bf16 checkpoint loads
    model = LeanVLMForConditionalGeneration.from_parts(llm, vision_config(), decoder=decoder).eval()
    assert {p.dtype for p in model.decoder.parameters()} == {torch.bfloat16}
    assert next(model.vision_model.parameters()).dtype == torch.float32
    ids = torch.tensor([prompt(model, 5, "<image>", 7)])
    out = model.generate(ids, pixel_values=pixels(1), max_new_tokens=3, eos_token_id=[])
    # an fp32 image context (e.g. encoded by an fp32 copy of the model) is cast to the text dtype, cache included
    context = model.encode_images(pixels(1)).to(torch.float32)
    assert torch.equal(model.generate(ids, image_context=context, max_new_tokens=3, eos_token_id=[]), out)


def test_generation_config_of_the_llm_is_kept_and_saved(tmp_path):
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(text_config("llama"))
    llm.generation_config.eos_token_id = [2, 7]  # e.g. end-of-text and end-of-turn of an instruct model
    model = LeanVLMForConditionalGeneration.from_parts(llm, vision_config())
    assert model.generation_config.eos_token_id == [2, 7]
    model.save_pretrained(tmp_path)
    loaded = LeanVLMForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.generation_config.eos_token_id == [2, 7]


@pytest.mark.parametrize("decoder,options", [
    ("vanilla", {"max_crops": 3}),
    ("himix", {}),
    ("proxyv", {"proxyv_start_layer": 1, "proxyv_reduce_factor": 2, "proxyv_proxy_init": "learned"}),
    ("vanilla", {"probe_skip_vision_ffn_from_layer": 1, "probe_vision_light_mlp": True}),
])
def test_parameter_groups_cover_every_parameter_once(decoder, options):
    model = build(decoder, **options)
    groups = model.parameter_groups()
    grouped = [id(p) for params in groups.values() for p in params]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    new_groups = set(groups) - {"language_model", "vision_model"}
    assert new_groups == set(model.decoder.parameter_groups())
    assert all(name.startswith("decoder.") for name, p in model.named_parameters()
               if any(p is q for g in new_groups for q in groups[g]))


def test_an_image_size_that_leaves_a_patch_remainder_is_accepted():
    from transformers import SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                image_size=36, patch_size=8)  # like SigLIP-384 with 14-pixel patches: 27 x 27
    model = LeanVLMForConditionalGeneration.from_parts(text_config(), vision, decoder="proxyv",
                                                       proxyv_start_layer=1, proxyv_reduce_factor=2)
    context = model.encode_images(torch.randn(1, 3, 36, 36))
    assert context.tokens.shape[1] == 16 and context.grid == (4, 4)


def test_training_loss_scores_only_labelled_positions_and_can_skip_logits():
    model = build("vanilla")
    ids = torch.tensor([prompt(model, 5, "<image>", 7, 8, 9)])
    labels = ids.clone()
    labels[0, :2] = -100
    full = model(ids, pixel_values=pixels(1), labels=labels)
    lean = model(ids, pixel_values=pixels(1), labels=labels, return_logits=False)
    assert lean.logits is None
    torch.testing.assert_close(lean.loss, full.loss)
    # layout: 5, 16 vision tokens, 7, 8, 9 -> the last vision token predicts 7, then 7 -> 8, 8 -> 9
    expected = torch.nn.functional.cross_entropy(full.logits[0, 16:19].float(), torch.tensor([7, 8, 9]))
    torch.testing.assert_close(full.loss, expected)


def test_a_truncated_weight_file_or_broken_processor_file_is_named(tmp_path):
    from leanvlm.eval.exact_match import load_model

    model = build("vanilla")
    model.save_pretrained(tmp_path)
    LeanVLMProcessor.for_model(model, bpe_tokenizer()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) - 100])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt"):
        LeanVLMForConditionalGeneration.from_pretrained(tmp_path)
    weights.write_bytes(whole)
    (tmp_path / "leanvlm_processor.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"leanvlm_processor\.json is not valid JSON"):
        load_model(str(tmp_path))
