"""Bad input gets a clear error that says what was wrong and what to do."""

import pytest
import torch
from tiny import build, pixels, prompt, text_config, vision_config
from transformers import GPT2Config, GPT2LMHeadModel

from leanvlm import LeanVLMConfig, LeanVLMForConditionalGeneration


def test_placeholder_count_must_match_image_count():
    model = build("himix")
    ids = torch.tensor([prompt(model, 5, "<image>", 7, "<image>")])
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\).*but 3 image\(s\)"):
        model(ids, pixel_values=pixels(3))
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\).*but 0 image\(s\)"):
        build("vanilla")(torch.tensor([prompt(model, 5, "<image>")]))


@pytest.mark.parametrize("bad", [torch.randn(3, 32, 32), torch.randn(1, 1, 32, 32), torch.randn(1, 3, 48, 48)])
def test_wrong_pixel_values_shape(bad):
    model = build("vanilla", vision="siglip")
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.tensor([prompt(model, 5, "<image>")]), pixel_values=bad)


def test_unknown_decoder_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"Unknown decoder .sparsevlm.*vanilla, himix, proxyv"):
        LeanVLMForConditionalGeneration.from_parts(text_config(), vision_config(), decoder="sparsevlm")
    with pytest.raises(ValueError, match="available decoders"):
        LeanVLMConfig(text_config=text_config(), vision_config=vision_config(), decoder="HiMix")


def test_unsupported_language_model_family_names_the_supported_ones():
    gpt2 = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)
    with pytest.raises(ValueError, match=r"Unsupported language model family 'gpt2'.*llama, mistral, qwen2, qwen3"):
        LeanVLMForConditionalGeneration.from_parts(gpt2, vision_config())
    with pytest.raises(ValueError, match="Unsupported language model family 'gpt2'"):
        LeanVLMForConditionalGeneration.from_parts(GPT2LMHeadModel(gpt2), vision_config())


def test_unknown_option_and_missing_directory():
    with pytest.raises(TypeError, match="fastv_keep_ratio"):
        LeanVLMForConditionalGeneration.from_parts(text_config(), vision_config(), fastv_keep_ratio=0.5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LeanVLMForConditionalGeneration.from_parts("/nonexistent/llm", vision_config())
    with pytest.raises(ValueError, match="vision_feature_select"):
        LeanVLMForConditionalGeneration.from_parts(text_config(), vision_config(), vision_feature_select="cls")


def test_image_context_must_come_from_the_same_decoder():
    himix, vanilla = build("himix"), build("vanilla")
    ids = torch.tensor([prompt(himix, 5, "<image>")])
    context = vanilla.encode_images(pixels(1))
    with pytest.raises(ValueError, match="encoded for the 'vanilla' decoder"):
        himix(ids, image_context=context)
    with pytest.raises(ValueError, match="either pixel_values or image_context"):
        vanilla(ids, pixel_values=pixels(1), image_context=context)


def test_prompts_the_decoder_cannot_read():
    himix = build("himix")
    with pytest.raises(ValueError, match=r"Sample\(s\) \[1\] have no tokens.*at least one text token"):
        himix(torch.tensor([prompt(himix, 5, "<image>"), prompt(himix, 0, "<image>")]),
              torch.tensor([[1, 1], [0, 1]]), pixel_values=pixels(2))
    with pytest.raises(ValueError, match=r"input_ids must be a \(batch, length\) tensor"):
        himix(torch.tensor([5, 6, 7]))
    with pytest.raises(TypeError, match="ImageContext"):
        himix(torch.tensor([prompt(himix, 5, "<image>")]), image_context=torch.zeros(1, 3))


def test_continuation_misuse():
    from leanvlm import KVCache

    model = build("vanilla")
    cache = KVCache(model.config.text_config.num_hidden_layers)
    model(torch.tensor([[5, 6, 7]]), cache=cache)
    with pytest.raises(ValueError, match="first forward of a cache"):
        model(torch.tensor([[8]]), pixel_values=pixels(1), cache=cache)
    with pytest.raises(ValueError, match="labels need the whole sequence"):
        model(torch.tensor([[8]]), labels=torch.tensor([[8]]), cache=cache)
    with pytest.raises(ValueError, match="holds 1 sample"):
        model(torch.tensor([[8], [9]]), cache=cache)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(torch.tensor([[5, 6]]), labels=torch.tensor([[5, 6]]), logits_to_keep=1)


def test_option_values_are_checked_when_the_model_is_built():
    with pytest.raises(ValueError, match=r"Vision feature layer -9 does not exist.*4 hidden states"):
        LeanVLMForConditionalGeneration.from_parts(text_config(), vision_config(), vision_feature_layer=-9)
    with pytest.raises(ValueError, match="himix option"):
        LeanVLMForConditionalGeneration.from_parts(text_config(), vision_config(), himix_feature_layers=[-1])
