"""The continuous-batching engine: requests that arrive at different steps, share the batch with others and leave at
different steps get exactly the greedy tokens `model.generate` gives each alone, for every policy; images are
encoded once; stop strings, cancels and seeds behave per request."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import bpe_tokenizer, build

from leanvlm import DECODERS, LeanVLMProcessor
from leanvlm.inference.engine import Engine, ImageInput
from leanvlm.inference.image_cache import ImageCache, content_key

OPTIONS = {"proxyv": dict(proxyv_start_layer=1, proxyv_reduce_factor=2), "fastv": dict(fastv_layer=1, keep_tokens=5)}


def picture(seed: int) -> ImageInput:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return ImageInput(Image.fromarray(pixels), content_key(pixels.tobytes()))


def setup(decoder="vanilla", family="llama", **engine_options):
    model = build(decoder, family, **OPTIONS.get(decoder, {}))
    processor = LeanVLMProcessor.for_model(model, bpe_tokenizer())
    return model, processor, Engine(model, processor, **engine_options)


def chats(engine):
    """(prompt ids, images) of different lengths and image counts; the first and fourth share an image."""
    shared = picture(1)
    turns = [("<image>\nWhat color is the square?", [shared]),
             ("How many circles? two three", []),
             ("<image><image>\nWhat color? red blue green", [picture(2), picture(3)]),
             ("<image>\nHow many?", [shared]),
             ("<image>\nWhat color is the square? How many circles?", [picture(4)])]
    return [(engine.chat_prompt([{"role": "user", "content": text}]), images) for text, images in turns]


def alone(model, processor, ids, images, max_new_tokens):
    """The new tokens `model.generate` gives one prompt, up to and including its first stop token."""
    extra = {}
    if images:
        pixel_values, extra["image_crops"] = processor.preprocess_images([i.image for i in images])
        extra["pixel_values"] = pixel_values
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, **extra)[0, len(ids):].tolist()
    stops = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
                else [model.config.text_config.eos_token_id])
    ended = next((i for i, t in enumerate(out) if t in stops), None)
    return out if ended is None else out[: ended + 1]


def serve(engine, requests, arrivals):
    """Submit requests at the given steps ({step: [indices]}); return each request's tokens and finish reason."""
    tokens, reasons, step = {}, {}, 0
    while engine.has_work() or step <= max(arrivals):
        for index in arrivals.get(step, []):
            engine.submit(requests[index])
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.token_ids)
            if output.finish_reason:
                reasons[output.request_id] = output.finish_reason
        step += 1
    return tokens, reasons


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: a sliding window over the padded rows
@pytest.mark.parametrize("decoder", list(DECODERS))
def test_requests_joining_and_leaving_get_the_tokens_they_get_alone(decoder, family):
    # three rows at most and a small prefill budget: requests wait, are prefilled in groups, and join mid-way
    model, processor, engine = setup(decoder, family, max_batch_size=3, max_prefill_tokens=60)
    budgets = [7, 3, 9, 5, 6]
    requests = [engine.request(ids, images, max_new_tokens=n, request_id=f"r{i}")
                for i, ((ids, images), n) in enumerate(zip(chats(engine), budgets, strict=True))]
    served, reasons = serve(engine, requests, {0: [0, 1, 2], 2: [3], 3: [4]})
    for i, ((ids, images), n) in enumerate(zip(chats(engine), budgets, strict=True)):
        expected = alone(model, processor, ids, images, n)
        assert served[f"r{i}"] == expected, f"request {i}"
        assert reasons[f"r{i}"] == ("length" if len(expected) == n and expected[-1] != 2 else "stop")
    assert engine.image_cache.hits >= 1  # the shared image was encoded once
    assert not engine.running and engine.cache.batch_size is None  # every row left and freed its slots


def test_a_cached_image_skips_the_encoder():
    model, _, engine = setup("himix")
    calls = []
    model.vision_model.embeddings.register_forward_hook(lambda *args: calls.append(1))  # every encoder run embeds
    ids, images = chats(engine)[0]
    for i in range(3):
        engine.submit(engine.request(ids, images, max_new_tokens=2, request_id=f"q{i}"))
        engine.run_until_done()
    assert len(calls) == 1 and (engine.image_cache.hits, engine.image_cache.misses) == (2, 1)


def test_the_image_cache_keeps_the_most_recently_used_within_its_bytes():
    model, processor, _ = setup("vanilla")
    one = model.encode_images(processor.preprocess_images([picture(0).image])[0])
    cache = ImageCache(max_bytes=2 * one.nbytes())
    for key in "abc":
        cache.put(key, one)
        cache.get("a")  # "a" stays the most recently used
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.bytes == 2 * one.nbytes() and cache.evictions == 1
    ImageCache(max_bytes=one.nbytes() - 1).put("big", one)  # larger than the whole budget: not kept, no error


def test_stop_strings_end_the_text_before_them_and_are_never_streamed():
    _, _, engine = setup("vanilla")
    ids, images = chats(engine)[4]
    engine.submit(engine.request(ids, images, max_new_tokens=12, request_id="free"))
    full = "".join(o.text for o in engine.run_until_done()["free"])
    assert len(full) >= 4, f"the tiny model's answer {full!r} is too short for this test"
    stop = full[2:4]
    engine.submit(engine.request(ids, images, max_new_tokens=12, stop=(stop, "never-produced"), request_id="cut"))
    outputs = engine.run_until_done()["cut"]
    streamed = "".join(o.text for o in outputs)
    assert streamed == full[: full.index(stop)] and outputs[-1].finish_reason == "stop"


def test_a_cancelled_request_leaves_and_its_neighbours_are_unchanged():
    model, processor, engine = setup("himix")
    requests = [engine.request(ids, images, max_new_tokens=8, request_id=f"r{i}")
                for i, (ids, images) in enumerate(chats(engine)[:3])]
    for request in requests:
        engine.submit(request)
    engine.step()
    engine.step()
    engine.cancel("r1")
    outputs = engine.run_until_done()
    assert outputs["r1"][-1].finish_reason == "cancelled" and outputs["r1"][-1].completion_tokens == 2
    for i in (0, 2):
        ids, images = chats(engine)[i]
        got = requests[i].output_ids
        assert got == alone(model, processor, ids, images, 8)


def test_a_seeded_sampled_request_gives_the_same_tokens_alone_and_in_a_batch():
    _, _, engine = setup("vanilla")
    (ids, images), *others = chats(engine)

    def sampled(request_id):
        return engine.request(ids, images, max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20, seed=7,
                              request_id=request_id)

    first = sampled("alone")
    engine.submit(first)
    engine.run_until_done()
    in_batch = sampled("in-batch")
    for i, (other_ids, other_images) in enumerate(others):
        engine.submit(engine.request(other_ids, other_images, max_new_tokens=5, do_sample=True, request_id=f"o{i}"))
    engine.submit(in_batch)
    engine.run_until_done()
    assert in_batch.output_ids == first.output_ids and len(first.output_ids) >= 1


def test_bad_requests_say_what_is_wrong():
    _, _, engine = setup("vanilla")
    ids, images = chats(engine)[0]
    with pytest.raises(ValueError, match="1 <image> placeholder"):
        engine.request(ids, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="beyond the model's context of 256"):
        engine.request(ids, images, max_new_tokens=250)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        engine.request(ids, images, max_new_tokens=0)
    with pytest.raises(ValueError, match="could not be decoded"):
        ImageInput.from_bytes(b"not an image")


@pytest.mark.parametrize("crops", [1, 3])  # 3: a base view and sub-crops, each with a newline
@pytest.mark.parametrize("decoder", list(DECODERS))
def test_the_prompt_length_the_engine_budgets_is_the_positions_the_prompt_takes(decoder, crops):
    model = build(decoder, **OPTIONS.get(decoder, {}), max_crops=crops)
    processor = LeanVLMProcessor.for_model(model, bpe_tokenizer())
    engine = Engine(model, processor)
    wide = ImageInput(Image.new("RGB", (64, 32)), "wide")  # two sub-crops side by side when crops are on
    for ids, images in [*chats(engine), (chats(engine)[0][0], [wide])]:
        extra = {}
        if images:
            extra["pixel_values"], extra["image_crops"] = processor.preprocess_images([i.image for i in images])
        cache = model.new_cache()
        with torch.no_grad():  # where the first generated token goes: the positions the prompt took
            model(torch.tensor([ids]), cache=cache, **extra)
        assert engine.prompt_length(ids, images) == int(cache.next_position[0])


def test_a_step_that_fails_ends_every_request_it_held_and_the_engine_serves_on(monkeypatch):
    _, _, engine = setup("himix", max_batch_size=2)
    requests = [engine.request(ids, images, max_new_tokens=6, request_id=f"r{i}")
                for i, (ids, images) in enumerate(chats(engine)[:4])]
    for request in requests[:2]:
        engine.submit(request)
    engine.step()  # r0 and r1 run
    for request in requests[2:]:
        engine.submit(request)  # r2 and r3 wait
    engine.max_batch_size = 4
    broken = engine.model.encode_images

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.model, "encode_images", fail)
    with pytest.raises(RuntimeError):
        engine.step()  # r2, r3 were taken for a prefill that failed
    finals = {o.request_id: o.finish_reason for o in engine.fail_all()}
    assert finals == {"r0": "error", "r1": "error", "r2": "error", "r3": "error"}
    monkeypatch.setattr(engine.model, "encode_images", broken)
    (ids, images), *_ = chats(engine)
    engine.submit(engine.request(ids, images, max_new_tokens=2, request_id="after"))
    assert engine.run_until_done()["after"][-1].finish_reason in ("length", "stop")


def test_a_seed_beyond_the_generator_or_a_vanishing_temperature_is_handled_before_the_engine():
    _, _, engine = setup("vanilla")
    ids, images = chats(engine)[0]
    with pytest.raises(ValueError, match="seed must be in"):
        engine.request(ids, images, do_sample=True, seed=2**64)
    tiny = engine.request(ids, images, max_new_tokens=3, do_sample=True, temperature=1e-300)
    assert not tiny.params.do_sample  # sampling at 1e-300 is the argmax, without overflowing the softmax


def test_without_max_tokens_the_answer_gets_the_default_within_the_context():
    _, _, engine = setup("vanilla", default_max_tokens=300)  # longer than the tiny model's context of 256
    ids, images = chats(engine)[0]
    request = engine.request(ids, images)
    assert request.params.max_new_tokens == 256 - engine.prompt_length(ids, images)
    engine.default_max_tokens = 5
    assert engine.request(ids, images).params.max_new_tokens == 5
