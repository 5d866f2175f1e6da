"""Text-only inputs: leanvlm's layer runner equals the Hugging Face causal LM it drives."""

import pytest
import torch
from tiny import TEXT_FAMILIES, build, left_padded


def hf_logits(model, ids):
    with torch.no_grad():
        return model.language_model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("decoder", ["vanilla", "himix"])
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_text_only_logits_equal_hf_causal_lm(family, decoder):
    model = build(decoder, family)
    torch.manual_seed(1)
    ids = torch.randint(3, 90, (2, 12))
    with torch.no_grad():
        ours = model(ids).logits
        reference = model.language_model(input_ids=ids).logits
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_left_padded_batch_equals_each_prompt_alone(family):
    model = build("vanilla", family)
    rows = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36]]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        out = model(ids, mask)
    for b, row in enumerate(rows):
        valid = out.attention_mask[b]
        torch.testing.assert_close(out.logits[b, valid], hf_logits(model, row), atol=1e-5, rtol=0)


def test_mistral_sliding_window_is_applied():
    model = build("vanilla", "mistral")  # sliding_window = 7 in the tiny config
    ids = list(range(3, 23))  # 20 tokens, longer than the window
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, hf_logits(model, ids), atol=1e-5, rtol=0)
    # and the window matters here: without it the last logits differ
    model.language_model.config.sliding_window = None
    with torch.no_grad():
        unwindowed = model(torch.tensor([ids])).logits[0]
    assert (unwindowed[-1] - ours[-1]).abs().max() > 1e-4
