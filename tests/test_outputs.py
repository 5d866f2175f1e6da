"""Every output object the public API returns, built through the real calls on a tiny model.

transformers owns `ModelOutput`'s constructor, key handling and field renames (5.24 renamed `past_key_values` to
`cache`); building each output here makes the next upstream change fail a test rather than the demo.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tiny import build, left_padded, pixels, prompt

from leanvlm import DECODERS, KVCache, LeanVLMOutput

FIELDS = ["loss", "logits", "cache", "attention_mask", "hidden_states", "vision_mask"]


def batch(model):
    rows = [prompt(model, 5, "<image>", 6, 7, 8), prompt(model, "<image>", 9, 10)]
    ids, mask = left_padded(rows)
    labels = torch.where(mask.bool() & (ids != model.config.image_token_id), ids, -100)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2), labels=labels)


def test_output_fields_are_the_documented_ones():
    assert [field.name for field in dataclasses.fields(LeanVLMOutput)] == FIELDS


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_forward_returns_every_field_by_name_key_and_position(decoder):
    model = build(decoder)
    layers = model.config.text_config.num_hidden_layers
    with torch.no_grad():
        out = model(**batch(model), use_cache=True, output_hidden_states=True)
    assert isinstance(out, LeanVLMOutput)
    assert math.isfinite(float(out.loss))
    assert isinstance(out.cache, KVCache) and out.cache.length == out.attention_mask.shape[1] + out.cache.prefix_len
    assert out["cache"] is out.cache and "cache" in out
    assert out.logits.shape[:2] == out.attention_mask.shape
    assert len(out.hidden_states) == layers + 1
    assert all(h.shape[:2] == out.attention_mask.shape for h in out.hidden_states)
    # None fields drop out of the tuple and the mapping, as in every HF output
    assert list(out.keys()) == [name for name in FIELDS if getattr(out, name) is not None]
    assert out.to_tuple()[0] is out.loss and out[1] is out.logits
    if not DECODERS[decoder].keeps_vision_tokens:  # vision tokens never enter the sequence
        assert out.vision_mask is None
    else:
        assert out.vision_mask.shape == out.attention_mask.shape and out.vision_mask.any()


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_a_given_cache_is_returned_and_continued(decoder):
    model = build(decoder)
    inputs = batch(model)
    del inputs["labels"]
    cache = KVCache(model.config.text_config.num_hidden_layers)
    with torch.no_grad():
        first = model(**inputs, cache=cache, logits_to_keep=1)
        assert first.cache is cache and first.logits.shape[1] == 1 and first.loss is None
        filled = cache.length
        step = model(torch.tensor([[11], [12]]), cache=cache)
    assert step.cache is cache and cache.length == filled + 1
    assert step.logits.shape == (2, 1, model.config.text_config.vocab_size)


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_training_forward_returns_loss_without_logits(decoder):
    model = build(decoder).train()
    out = model(**batch(model), return_logits=False)
    assert out.logits is None and out.cache is None and out.loss.requires_grad
    out.loss.backward()
    assert any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_generate_returns_prompt_followed_by_new_tokens(decoder):
    model = build(decoder)
    inputs = batch(model)
    del inputs["labels"]
    out = model.generate(**inputs, max_new_tokens=3, eos_token_id=[])
    assert out.dtype == torch.long and out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_trainer_step_returns_the_batch_loss():
    from accelerate import Accelerator

    from leanvlm.train.trainer import accumulate_gradients

    model = build("himix").train()
    inputs = batch(model)
    with torch.no_grad():
        expected = float(model(**inputs, return_logits=False).loss)
    loss = accumulate_gradients(model, [inputs], Accelerator(cpu=True))
    assert isinstance(loss, float) and loss == pytest.approx(expected, rel=1e-5)
