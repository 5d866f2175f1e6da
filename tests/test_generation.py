"""Batched KV-cache generation: equal to one-by-one runs, to full recomputation, and to itself with reused images."""

import pytest
import torch
from tiny import build, cached_and_recomputed, left_padded, pixels, prompt

from leanvlm import KVCache
from leanvlm.generation import SamplingParams, generate_steps, sample

DECODERS = ["vanilla", "himix"]


def three_prompts(model):
    """Different lengths, different images, and a text-only prompt; images in placeholder order."""
    rows = [
        prompt(model, 5, "<image>", 7, 8),
        prompt(model, 9, 10, 11, 12, "<image>", 13, 14, 15, 16),
        prompt(model, 17, 18),
    ]
    images_per_row = [[0], [1], []]
    return rows, images_per_row, pixels(2, seed=3)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("decoder", DECODERS)
def test_batched_greedy_equals_one_by_one(decoder, family):
    model = build(decoder, family)
    rows, images_per_row, images = three_prompts(model)
    ids, mask = left_padded(rows)
    batched = model.generate(ids, mask, pixel_values=images, max_new_tokens=8, eos_token_id=[])
    assert batched.shape == (3, ids.shape[1] + 8)
    assert torch.equal(batched[:, : ids.shape[1]], ids)  # prompt first, like transformers
    for b, row in enumerate(rows):
        single_images = images[images_per_row[b]] if images_per_row[b] else None
        single = model.generate(torch.tensor([row]), pixel_values=single_images, max_new_tokens=8, eos_token_id=[])
        assert batched[b, ids.shape[1] :].tolist() == single[0, len(row) :].tolist()


@pytest.mark.parametrize("decoder", DECODERS)
def test_cached_decoding_equals_full_recomputation(decoder):
    model = build(decoder, "qwen3")
    rows, _, images = three_prompts(model)
    ids, mask = left_padded(rows)
    stepped, full, cache = cached_and_recomputed(model, ids, mask, torch.randint(3, 90, (3, 4)),
                                                 pixel_values=images)
    torch.testing.assert_close(stepped, full, atol=1e-4, rtol=0)
    # longest prompt: its placeholder becomes 16 vision tokens (vanilla) or 16 prefix keys in front of the text
    # (himix); then 4 decoded tokens
    text = model.config.text_config
    slots = (ids.shape[1] - 1) + 16 + 4
    assert cache.length == slots
    assert cache.nbytes() == 2 * text.num_hidden_layers * 3 * text.num_key_value_heads * slots * text.head_dim * 4


@pytest.mark.parametrize("decoder", DECODERS)
def test_generation_from_image_context_equals_generation_from_pixels(decoder):
    model = build(decoder)
    rows, _, images = three_prompts(model)
    ids, mask = left_padded(rows)
    from_pixels = model.generate(ids, mask, pixel_values=images, max_new_tokens=6, eos_token_id=[])
    context = model.encode_images(images)
    assert torch.equal(model.generate(ids, mask, image_context=context, max_new_tokens=6, eos_token_id=[]), from_pixels)


@pytest.mark.parametrize("decoder", DECODERS)
def test_one_image_context_serves_many_prompts(decoder):
    model = build(decoder)
    context = model.encode_images(pixels(1, seed=5))
    questions = [prompt(model, "<image>", 7, 8), prompt(model, "<image>", 20, 21, 22, 23), prompt(model, "<image>", 30)]
    ids, mask = left_padded(questions)
    batched = model.generate(ids, mask, image_context=context[[0, 0, 0]], max_new_tokens=5, eos_token_id=[])
    for b, question in enumerate(questions):
        alone = model.generate(torch.tensor([question]), pixel_values=pixels(1, seed=5), max_new_tokens=5,
                               eos_token_id=[])
        assert batched[b, ids.shape[1] :].tolist() == alone[0, len(question) :].tolist()


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = build("himix")
    rows, _, images = three_prompts(model)
    ids, mask = left_padded(rows)
    kwargs = dict(pixel_values=images, max_new_tokens=6, eos_token_id=[])
    greedy = model.generate(ids, mask, **kwargs)
    top1 = model.generate(ids, mask, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(top1, greedy)
    sampled = [
        model.generate(ids, mask, do_sample=True, temperature=1.5, top_p=0.9,
                       generator=torch.Generator().manual_seed(seed), **kwargs)
        for seed in (1, 1, 2)
    ]
    assert torch.equal(sampled[0], sampled[1])
    assert not torch.equal(sampled[0], sampled[2])
    assert not torch.equal(sampled[0], greedy)


def test_eos_stops_a_sample_and_pads_it():
    model = build("vanilla")
    rows, _, images = three_prompts(model)
    ids, mask = left_padded(rows)
    greedy = model.generate(ids, mask, pixel_values=images, max_new_tokens=6, eos_token_id=[])
    new = greedy[:, ids.shape[1] :]
    eos = new[0, 1].item()  # sample 0's second token becomes the end-of-sequence token
    out = model.generate(ids, mask, pixel_values=images, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    out_new = out[:, ids.shape[1] :]
    first_eos = (new == eos).int().argmax(dim=1)
    for b in range(3):
        if (new[b] == eos).any():
            stop = first_eos[b].item()
            assert out_new[b, : stop + 1].tolist() == new[b, : stop + 1].tolist()
            assert (out_new[b, stop + 1 :] == 0).all()
        else:
            assert out_new[b].tolist() == new[b, : out_new.shape[1]].tolist()


def test_generation_stops_when_every_sample_has_ended():
    model = build("himix")
    ids = torch.tensor([prompt(model, 5, "<image>", 7)])
    first = model.generate(ids, pixel_values=pixels(1), max_new_tokens=1, eos_token_id=[])[0, -1].item()
    out = model.generate(ids, pixel_values=pixels(1), max_new_tokens=10, eos_token_id=first)
    assert out.shape[1] == ids.shape[1] + 1


def test_generation_stops_at_any_eos_of_the_generation_config():
    model = build("himix")
    ids = torch.tensor([prompt(model, 5, "<image>", 7)])
    first = model.generate(ids, pixel_values=pixels(1), max_new_tokens=1, eos_token_id=[])[0, -1].item()
    model.generation_config.eos_token_id = [first + 1 if first < 90 else 3, first]
    assert model.generate(ids, pixel_values=pixels(1), max_new_tokens=10).shape[1] == ids.shape[1] + 1


def test_a_masked_continuation_token_does_not_advance_the_position():
    model = build("vanilla", "llama")
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad():
        cache = KVCache(model.config.text_config.num_hidden_layers)
        model(ids, cache=cache)
        model(torch.tensor([[11], [12]]), torch.tensor([[1], [0]]), cache=cache)  # sample 1: padding
        step = model(torch.tensor([[13], [14]]), cache=cache).logits[:, -1]
        full = model(torch.tensor([[5, 6, 7, 11, 13], [0, 8, 9, 10, 14]]),
                     torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


def test_a_hand_written_decode_loop_grows_the_cache_geometrically():
    model = build("vanilla")
    cache = KVCache(model.config.text_config.num_hidden_layers)
    capacities = []
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), cache=cache)
        for token in range(20, 52):
            model(torch.tensor([[token]]), cache=cache)
            capacities.append(cache.keys[0].shape[2])
    assert cache.length == 35
    assert len(set(capacities)) <= 5  # 3 -> 6 -> 12 -> 24 -> 48, not one reallocation per token


@pytest.mark.parametrize("settings", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8),
                                      dict(temperature=1.5, top_k=20, top_p=0.6)])
def test_sampling_filters_like_transformers_warpers(settings):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(256, 96, generator=torch.Generator().manual_seed(0)) * 3
    warpers = LogitsProcessorList()
    if "temperature" in settings:
        warpers.append(TemperatureLogitsWarper(settings["temperature"]))
    if "top_k" in settings:
        warpers.append(TopKLogitsWarper(settings["top_k"]))
    if "top_p" in settings:
        warpers.append(TopPLogitsWarper(settings["top_p"]))
    expected = torch.multinomial(warpers(None, logits).softmax(dim=-1), 1,
                                 generator=torch.Generator().manual_seed(1)).squeeze(1)
    tokens = sample(logits, SamplingParams(do_sample=True, **settings), torch.Generator().manual_seed(1))
    assert torch.equal(tokens, expected)


def test_a_suppressed_token_is_never_produced():
    logits = torch.randn(4, 96, generator=torch.Generator().manual_seed(0))
    logits[:, 7] = 100.0  # the most likely token by far
    greedy = sample(logits, SamplingParams(suppress_token_ids=[7]))
    others = logits.clone()
    others[:, 7] = float("-inf")
    assert torch.equal(greedy, others.argmax(dim=-1))
    sampled = sample(logits, SamplingParams(do_sample=True, top_k=2, suppress_token_ids=7),
                     torch.Generator().manual_seed(0))
    assert not (sampled == 7).any() and logits[:, 7].eq(100.0).all()  # the caller's logits are left unchanged


def test_the_image_placeholder_is_suppressed_and_stop_ids_come_from_the_model():
    model = build("vanilla")
    model.generation_config.eos_token_id = [2, 4]
    params = SamplingParams().with_model_defaults(model)
    assert params.suppress_token_ids == (model.config.image_token_id,)
    assert params.stop_token_ids == (2, 4) and params.pad_token_id == model.config.text_config.pad_token_id
    assert SamplingParams(stop_token_ids=[]).with_model_defaults(model).stop_token_ids == ()


@pytest.mark.parametrize("bad, message", [(dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
                                          (dict(do_sample=True, temperature=0), "temperature must be > 0"),
                                          (dict(top_p=1.5), r"top_p must be in \[0, 1\]"),
                                          (dict(top_k=-1), "top_k must be >= 0")])
def test_bad_sampling_params_say_what_is_allowed(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


def test_steps_are_the_new_tokens_of_generate_and_flag_finished_rows():
    model = build("vanilla")
    rows, _, images = three_prompts(model)
    ids, mask = left_padded(rows)
    greedy = model.generate(ids, mask, pixel_values=images, max_new_tokens=6, eos_token_id=[])[:, ids.shape[1]:]
    eos = greedy[0, 1].item()  # sample 0 ends at its second token
    params = SamplingParams(max_new_tokens=6, stop_token_ids=[eos], pad_token_id=0)
    steps = list(generate_steps(model, ids, mask, params=params, pixel_values=images))
    out = model.generate(ids, mask, pixel_values=images, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(torch.stack([step.tokens for step in steps], dim=1), out[:, ids.shape[1]:])
    for t, step in enumerate(steps):
        assert step.finished.tolist() == (greedy[:, : t + 1] == eos).any(dim=1).tolist()


class RecordingStreamer:
    """transformers' streamer protocol: `put` receives the prompt, then every step's tokens; `end` closes."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        assert not self.ended
        self.puts.append(value)

    def end(self):
        self.ended = True


def test_a_streamer_gets_the_prompt_then_every_step():
    model = build("himix")
    rows, _, images = three_prompts(model)
    ids, mask = left_padded(rows)
    streamer = RecordingStreamer()
    out = model.generate(ids, mask, pixel_values=images, max_new_tokens=4, eos_token_id=[], streamer=streamer)
    assert streamer.ended and len(streamer.puts) == 5 and torch.equal(streamer.puts[0], ids)
    assert torch.equal(torch.stack(streamer.puts[1:], dim=1), out[:, ids.shape[1]:])


def test_a_seed_in_the_params_makes_sampling_repeatable():
    model = build("himix")
    rows, _, images = three_prompts(model)
    ids, mask = left_padded(rows)

    def sampled(seed):
        params = SamplingParams(max_new_tokens=6, do_sample=True, temperature=1.5, stop_token_ids=[], seed=seed)
        return torch.stack([s.tokens for s in generate_steps(model, ids, mask, params=params, pixel_values=images)])

    assert torch.equal(sampled(3), sampled(3)) and not torch.equal(sampled(3), sampled(4))


@pytest.mark.parametrize("decoder", ["vanilla", "himix", "proxyv"])
def test_generation_from_cached_features_equals_generation_from_pixels(decoder):
    from leanvlm.vision import encode_features

    model = build(decoder)
    rows, _, images = three_prompts(model)
    ids, mask = left_padded(rows)
    with torch.no_grad():
        features = encode_features(model.vision_model, images, model.config.feature_layers,
                                   model.config.vision_feature_select)
    from_pixels = model.generate(ids, mask, pixel_values=images, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(model.generate(ids, mask, vision_features=features, max_new_tokens=5, eos_token_id=[]),
                       from_pixels)


def test_prefill_then_decode_steps_equal_the_forward_continuation():
    model = build("himix", "qwen3")
    rows, _, images = three_prompts(model)
    ids, mask = left_padded(rows)
    new = torch.randint(3, 90, (3, 3))
    with torch.no_grad():
        cache = model.new_cache()
        stepped = [model.prefill(ids, mask, pixel_values=images, cache=cache).logits[:, -1]]
        stepped += [model.decode_step(new[:, t], cache) for t in range(new.shape[1])]
        continued = KVCache(model.config.text_config.num_hidden_layers)
        expected = [model(ids, mask, pixel_values=images, cache=continued).logits[:, -1]]
        expected += [model(new[:, t : t + 1], cache=continued).logits[:, -1] for t in range(new.shape[1])]
    torch.testing.assert_close(torch.stack(stepped), torch.stack(expected), atol=1e-5, rtol=0)


def test_image_crops_do_not_go_with_an_image_context():
    model = build("vanilla")
    context = model.encode_images(pixels(1))
    with pytest.raises(ValueError, match="an image_context carries its own crops"):
        model.generate(torch.tensor([prompt(model, 5, "<image>")]), image_context=context, image_crops=[1])
