"""The KV cache as a running batch: rows that leave (`select`) and rows that join (`merge`) keep exactly the
attention, and the greedy tokens, they would have alone."""

import pytest
import torch
from tiny import build, left_padded, pixels, prompt, recomputed

from leanvlm import DECODERS
from leanvlm.generation import SamplingParams, sample

VARIANTS = {
    **{name: (name, {}) for name in DECODERS},
    "proxyv": ("proxyv", dict(proxyv_start_layer=1, proxyv_reduce_factor=2)),  # 4x4 patch grid -> 2x2 proxies
    "fastv": ("fastv", dict(fastv_layer=1, keep_tokens=5)),  # of 16 tokens; pyramiddrop's default drops too
    # vision keys in some layers only: the other layers' buffers hold no prefix slots
    "himix_sparse": ("himix", dict(himix_layers=[1])),
    "himix_sparse_separate": ("himix", dict(himix_layers=[0, 2], himix_separate_vision_softmax=True)),
}
FAMILIES = ["llama", "mistral"]  # mistral: sliding window 7, so distances between text slots matter


def model_for(variant, family):
    decoder, options = VARIANTS[variant]
    return build(decoder, family, **options)


def requests(model):
    """(prompt, images) of different lengths: text-only, one image, two images."""
    return [
        (prompt(model, 5, "<image>", 7, 8), pixels(1, seed=1)),
        (prompt(model, 9, 10, 11, 12, 13, 14, "<image>", 15, 16, 17), pixels(1, seed=2)),
        (prompt(model, 17, 18), None),
        (prompt(model, 20, "<image>", 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31), pixels(1, seed=4)),
        (prompt(model, 30, "<image>", 31, "<image>", 32), pixels(2, seed=5)),
    ]


def prefill(model, batch):
    """A new cache holding the left-padded `batch` of (prompt, images); returns (cache, last logits (B, V))."""
    ids, mask = left_padded([row for row, _ in batch])
    images = [image for _, image in batch if image is not None]
    cache = model.new_cache()
    out = model.prefill(ids, mask, pixel_values=torch.cat(images) if images else None, cache=cache)
    return cache, out.logits[:, -1]


def alone(model, row, images, new_tokens):
    """Next-token logits (V,) of one request's prompt + new tokens, recomputed on its own (`tiny.recomputed`)."""
    images = {} if images is None else {"pixel_values": images}
    return recomputed(model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long),
                      torch.tensor([new_tokens]), **images)[0, -1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("decoder", list(VARIANTS))
@torch.no_grad()
def test_merged_and_selected_rows_attend_exactly_as_alone(decoder, family):
    model = model_for(decoder, family)
    reqs = requests(model)
    running, _ = prefill(model, reqs[:3])
    joining, _ = prefill(model, reqs[3:])  # longer text and more vision keys than the running rows
    held = torch.cat([running.row_lengths(), joining.row_lengths()])
    running.merge(joining)
    assert running.batch_size == 5 and torch.equal(running.row_lengths(), held)  # merging adds only padding
    first = torch.tensor([40, 41, 42, 43, 44])
    logits = model.decode_step(first, running)
    for b, (row, images) in enumerate(reqs):
        torch.testing.assert_close(logits[b], alone(model, row, images, [40 + b]), atol=1e-4, rtol=0)

    running.select([2, 0])  # the longest texts and the most vision keys leave, the order changes
    # request 0 now has both the longest text and the most vision keys: the slots nobody uses are gone
    assert running.length == int(running.row_lengths().max())
    logits = model.decode_step(torch.tensor([50, 51]), running)
    for b, request in enumerate([2, 0]):
        row, images = reqs[request]
        expected = alone(model, row, images, [40 + request, 50 + b])
        torch.testing.assert_close(logits[b], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("decoder", list(VARIANTS))
@pytest.mark.parametrize("arrivals", [
    {0: [0, 1, 2], 2: [3], 4: [4]},  # step -> requests prefilled together, then merged
    {0: [2], 1: [0], 2: [1, 3], 3: [4]},  # images join a text-only batch
])
def test_a_running_batch_with_joining_and_leaving_rows_generates_the_one_by_one_tokens(decoder, family, arrivals):
    model = model_for(decoder, family)
    reqs = requests(model)
    budgets = [6, 3, 9, 5, 4]  # new tokens per request: rows leave at different steps
    served = continuous_batching(model, reqs, budgets, arrivals)
    for request, ((row, images), budget) in enumerate(zip(reqs, budgets, strict=True)):
        alone = model.generate(torch.tensor([row]), pixel_values=images, max_new_tokens=budget, eos_token_id=[])
        assert served[request] == alone[0, len(row):].tolist(), f"request {request}"


@torch.no_grad()
def continuous_batching(model, reqs, budgets, arrivals):
    """Greedy tokens per request from one running cache: arrivals are prefilled in a cache of their own and merged;
    a row leaves the cache once its budget is spent."""
    params = SamplingParams(stop_token_ids=[]).with_model_defaults(model)
    cache, rows, logits = model.new_cache(), [], None
    served = {request: [] for request in range(len(reqs))}
    step = 0
    while rows or step <= max(arrivals):
        if step in arrivals:
            joining, new_logits = prefill(model, [reqs[r] for r in arrivals[step]])
            cache.merge(joining)
            rows += arrivals[step]
            logits = new_logits if logits is None else torch.cat([logits, new_logits])
        tokens = sample(logits, params)  # (rows,)
        for b, request in enumerate(rows):
            served[request].append(int(tokens[b]))
        keep = [len(served[request]) < budgets[request] for request in rows]
        cache.select(keep)
        rows = [request for request, kept in zip(rows, keep, strict=True) if kept]
        tokens = tokens[torch.tensor(keep)]
        logits = model.decode_step(tokens, cache) if rows else None
        step += 1
    return served


@torch.no_grad()
def test_a_cache_emptied_by_select_takes_new_rows():
    model = model_for("himix", "llama")
    reqs = requests(model)
    cache, _ = prefill(model, reqs[:2])
    cache.select([])
    assert cache.batch_size is None and cache.length == 0 and cache.nbytes() == 0
    joining, _ = prefill(model, reqs[2:3])
    cache.merge(joining)
    row, _ = reqs[2]
    torch.testing.assert_close(model.decode_step(torch.tensor([40]), cache)[0],
                               alone(model, row, None, [40]), atol=1e-4, rtol=0)


def test_cache_misuse_is_refused():
    model = model_for("vanilla", "llama")
    reqs = requests(model)
    with torch.no_grad():
        cache, _ = prefill(model, reqs[:1])
        with pytest.raises(ValueError, match="prefill fills an empty cache"):
            model.prefill(torch.tensor([[5, 6]]), cache=cache)
    with pytest.raises(RuntimeError, match="empty or has a block open"):
        cache.merge(model.new_cache())
    with torch.no_grad():
        cache, _ = prefill(model, reqs[:3])
        with pytest.raises(ValueError, match=r"one entry per row \(3\)"):
            cache.select([True, False])
        with pytest.raises(ValueError, match=r"distinct indices in 0\.\.2"):
            cache.select([0, 0])
        with pytest.raises(ValueError, match=r"distinct indices in 0\.\.2"):
            cache.select([3])
        other, _ = prefill(model.to(torch.bfloat16), reqs[3:4])
        with pytest.raises(ValueError, match=r"torch\.bfloat16 .* into one of torch\.float32"):
            cache.merge(other)
