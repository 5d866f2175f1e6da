"""Property tests for the attention-mask builders (shared builder, vanilla policy, HiMix policy).

Every builder output is compared with an explicit reference written with plain Python loops from the documented rule:
keys are `[prefix | text]`, queries are the last `num_queries` text keys, a valid query sees every valid prefix key
and the valid text keys at or before itself (within the window, if any).
"""

from __future__ import annotations

import math

import pytest
import tiny
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leanvlm.decoders.attention import CAUSAL, attend, build_mask
from leanvlm.decoders.vanilla import VanillaDecoder

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------------------


def reference_mask(key_valid: list[list[bool]], num_queries: int, prefix_len: int, window: int | None):
    """(B, num_queries, K) nested lists of bools, straight from the rule."""
    rows = []
    for valid in key_valid:
        num_keys = len(valid)
        num_text = num_keys - prefix_len
        sample = []
        for t in range(num_queries):
            q = num_text - num_queries + t
            row = []
            for j in range(num_keys):
                if not valid[j]:
                    row.append(False)
                elif j < prefix_len:
                    row.append(True)
                else:
                    i = j - prefix_len
                    row.append(i <= q and (window is None or q - i < window))
            sample.append(row)
        rows.append(sample)
    return rows


def query_is_valid(key_valid: list[list[bool]], b: int, t: int, num_queries: int) -> bool:
    num_keys = len(key_valid[b])
    return key_valid[b][num_keys - num_queries + t]


def expand(result, batch: int, num_queries: int, num_keys: int, prefix_len: int) -> torch.Tensor:
    """Builder output -> dense (B, 1, T, K) bool tensor. Also checks the shortcuts' preconditions."""
    if result is None:
        return torch.ones(batch, 1, num_queries, num_keys, dtype=torch.bool)
    if isinstance(result, str):
        assert result == CAUSAL
        # SDPA's is_causal is top-left aligned: only the same as "query i sees keys <= i" when T == K.
        assert num_queries == num_keys, "CAUSAL returned although queries are not all keys"
        assert prefix_len == 0, "CAUSAL returned although there are position-free prefix keys"
        causal = torch.ones(num_queries, num_keys).tril().bool()
        return causal.expand(batch, 1, num_queries, num_keys).clone()
    assert isinstance(result, torch.Tensor)
    assert result.dtype == torch.bool
    assert tuple(result.shape) == (batch, 1, num_queries, num_keys)
    return result


def check_against_reference(result, key_valid: list[list[bool]], num_queries: int, prefix_len: int, window):
    batch, num_keys = len(key_valid), len(key_valid[0])
    if result is None or isinstance(result, str):
        assert all(all(row) for row in key_valid), f"shortcut {result!r} returned although some keys are padding"
    dense = expand(result, batch, num_queries, num_keys, prefix_len)
    expected = reference_mask(key_valid, num_queries, prefix_len, window)
    for b in range(batch):
        for t in range(num_queries):
            got = dense[b, 0, t].tolist()
            assert any(got), f"row b={b} t={t} sees no key at all (SDPA would give NaN)"
            if query_is_valid(key_valid, b, t, num_queries):
                assert got == expected[b][t], (
                    f"b={b} t={t} prefix_len={prefix_len} window={window} key_valid={key_valid[b]}\n"
                    f"got      {[int(x) for x in got]}\nexpected {[int(x) for x in expected[b][t]]}"
                )


# --------------------------------------------------------------------------------------------------------------------
# Input strategies
# --------------------------------------------------------------------------------------------------------------------

windows = st.none() | st.integers(1, 10)


@st.composite
def layouts(draw, max_prefix: int = 5):
    """Structured inputs as the model produces them: per sample, valid prefix slots first, then invalid ones;
    the text block left-padded."""
    batch = draw(st.integers(1, 3))
    prefix_len = draw(st.integers(0, max_prefix))
    text_len = draw(st.integers(1, 8))
    num_queries = draw(st.integers(1, text_len))
    window = draw(windows)
    all_valid = draw(st.booleans())  # exercise the shortcut paths often
    key_valid = []
    for _ in range(batch):
        if all_valid:
            key_valid.append([True] * (prefix_len + text_len))
            continue
        n_prefix = draw(st.integers(0, prefix_len))
        if num_queries == text_len:  # prefill: a prompt keeps at least one token
            pad = draw(st.integers(0, text_len - 1))
        else:  # decode-like: any amount of left padding
            pad = draw(st.integers(0, text_len))
        prefix = [True] * n_prefix + [False] * (prefix_len - n_prefix)
        text = [False] * pad + [True] * (text_len - pad)
        key_valid.append(prefix + text)
    return key_valid, num_queries, prefix_len, window


@st.composite
def arbitrary_layouts(draw, max_prefix: int = 5):
    """Any validity pattern at all (the rule is defined for every pattern)."""
    batch = draw(st.integers(1, 3))
    prefix_len = draw(st.integers(0, max_prefix))
    text_len = draw(st.integers(1, 8))
    num_queries = draw(st.integers(1, text_len))
    window = draw(windows)
    num_keys = prefix_len + text_len
    key_valid = [draw(st.lists(st.booleans(), min_size=num_keys, max_size=num_keys)) for _ in range(batch)]
    return key_valid, num_queries, prefix_len, window


def as_tensor(key_valid: list[list[bool]]) -> torch.Tensor:
    return torch.tensor(key_valid, dtype=torch.bool)


@pytest.fixture(scope="module")
def vanilla_decoder():
    return tiny.build("vanilla").decoder


@pytest.fixture(scope="module")
def himix_decoder():
    return tiny.build("himix").decoder


# --------------------------------------------------------------------------------------------------------------------
# The shared builder
# --------------------------------------------------------------------------------------------------------------------


# layouts as batches have them (left padding), and any validity pattern at all
@pytest.mark.parametrize("strategy", [layouts(), arbitrary_layouts()], ids=["left_padded", "any_validity"])
@SETTINGS
@given(data=st.data())
def test_build_mask_matches_reference(strategy, data):
    key_valid, num_queries, prefix_len, window = data.draw(strategy)
    result = build_mask(as_tensor(key_valid), num_queries, prefix_len=prefix_len, window=window)
    check_against_reference(result, key_valid, num_queries, prefix_len, window)


@SETTINGS
@given(layouts())
def test_build_mask_is_per_sample(case):
    """Building the mask for a batch gives, row by row, what each sample alone would give."""
    key_valid, num_queries, prefix_len, window = case
    batch, num_keys = len(key_valid), len(key_valid[0])
    together = expand(
        build_mask(as_tensor(key_valid), num_queries, prefix_len, window), batch, num_queries, num_keys, prefix_len
    )
    for b in range(batch):
        if not all(key_valid[b]):
            continue  # padding-query rows are unspecified; only compare samples with no padding
        alone = expand(build_mask(as_tensor([key_valid[b]]), num_queries, prefix_len, window), 1, num_queries,
                       num_keys, prefix_len)
        assert torch.equal(together[b], alone[0])


def test_shortcuts_are_used_only_when_exact():
    full = torch.ones(2, 5, dtype=torch.bool)
    assert build_mask(full, 5) == CAUSAL  # prefill, no padding, no window
    assert build_mask(full, 1) is None  # one new token sees everything
    assert build_mask(full, 1, prefix_len=2) is None
    # a window narrower than the text, a padding key, a prefix, or fewer queries than keys: no CAUSAL shortcut
    for result in (
        build_mask(full, 5, window=3),
        build_mask(torch.tensor([[True] * 5, [False] + [True] * 4]), 5),
        build_mask(full, 3, prefix_len=2),
        build_mask(full, 3),
    ):
        assert isinstance(result, torch.Tensor)
    padded = torch.tensor([[False, True, True]])
    assert isinstance(build_mask(padded, 1), torch.Tensor)
    assert not build_mask(padded, 1)[0, 0, 0, 0]


def test_window_never_hides_prefix_keys():
    key_valid = torch.ones(1, 3 + 6, dtype=torch.bool)
    mask = build_mask(key_valid, 6, prefix_len=3, window=1)
    assert mask[0, 0, :, :3].all()
    # window 1: each text query sees only itself among the text keys
    assert torch.equal(mask[0, 0, :, 3:], torch.eye(6, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(layouts(max_prefix=0))
def test_vanilla_policy_is_causal_with_padding(vanilla_decoder, case):
    key_valid, num_queries, prefix_len, window = case
    assert prefix_len == 0
    result = vanilla_decoder.build_mask(as_tensor(key_valid), num_queries, 0, window)
    check_against_reference(result, key_valid, num_queries, 0, window)
    # the method does not depend on the instance
    unbound = VanillaDecoder.build_mask(None, as_tensor(key_valid), num_queries, 0, window)
    batch, n = len(key_valid), len(key_valid[0])
    assert torch.equal(expand(result, batch, num_queries, n, 0), expand(unbound, batch, num_queries, n, 0))


@pytest.mark.parametrize("prefix_len", [1, 3])
def test_vanilla_policy_rejects_prefix_keys(vanilla_decoder, prefix_len):
    key_valid = torch.ones(2, prefix_len + 4, dtype=torch.bool)
    with pytest.raises(ValueError):
        vanilla_decoder.build_mask(key_valid, 4, prefix_len, None)
    with pytest.raises(ValueError):
        VanillaDecoder.build_mask(None, key_valid, 1, prefix_len, 4)


@SETTINGS
@given(layouts())
def test_himix_policy_matches_reference(himix_decoder, case):
    key_valid, num_queries, prefix_len, window = case
    result = himix_decoder.build_mask(as_tensor(key_valid), num_queries, prefix_len, window)
    check_against_reference(result, key_valid, num_queries, prefix_len, window)
    unbound = build_mask(as_tensor(key_valid), num_queries, prefix_len=prefix_len, window=window)
    batch, n = len(key_valid), len(key_valid[0])
    assert torch.equal(
        expand(result, batch, num_queries, n, prefix_len), expand(unbound, batch, num_queries, n, prefix_len)
    )


@SETTINGS
@given(layouts(), st.data())
def test_himix_valid_queries_see_exactly_their_valid_vision_keys(himix_decoder, case, data):
    """Direct statement of the HiMix rule on the prefix block: all valid vision keys, never an invalid one,
    whatever the window."""
    key_valid, num_queries, prefix_len, window = case
    batch, num_keys = len(key_valid), len(key_valid[0])
    dense = expand(himix_decoder.build_mask(as_tensor(key_valid), num_queries, prefix_len, window), batch,
                   num_queries, num_keys, prefix_len)
    for b in range(batch):
        for t in range(num_queries):
            if query_is_valid(key_valid, b, t, num_queries):
                assert dense[b, 0, t, :prefix_len].tolist() == key_valid[b][:prefix_len]


def test_himix_sample_without_images_sees_no_vision_key(himix_decoder):
    # sample 0: 2 images' worth of vision keys (4), sample 1: text only; text left-padded in sample 1
    prefix = [[True] * 4, [False] * 4]
    text = [[True] * 5, [False, False, True, True, True]]
    key_valid = as_tensor([p + t for p, t in zip(prefix, text, strict=True)])
    mask = himix_decoder.build_mask(key_valid, 5, 4, None)
    assert isinstance(mask, torch.Tensor)
    assert mask[0, 0, :, :4].all()
    assert not mask[1, 0, 2:, :4].any()  # valid text queries of sample 1
    # text part of sample 1: causal over its 3 valid tokens
    assert torch.equal(mask[1, 0, 2:, 6:], torch.ones(3, 3).tril().bool())
    assert not mask[1, 0, 2:, 4:6].any()


# --------------------------------------------------------------------------------------------------------------------
# Behaviour with scaled_dot_product_attention
# --------------------------------------------------------------------------------------------------------------------


def explicit_attention(query, key, value, dense_mask, scale):
    """Softmax attention with repeated K/V heads: query head h uses K/V head h // (H / H_kv)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.einsum("bhtd,bhkd->bhtk", query.double(), key.double()) * scale
    scores = scores.masked_fill(~dense_mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bhtk,bhkd->bhtd", weights, value.double()).float()


@settings(max_examples=60, deadline=None)
@given(layouts(), st.integers(0, 2**31 - 1), st.sampled_from(["vanilla", "himix"]))
def test_attend_with_builder_mask_matches_explicit_softmax(case, seed, policy):
    key_valid, num_queries, prefix_len, window = case
    if policy == "vanilla":
        # vanilla has no prefix: fold the prefix slots into the text (as plain keys)
        build = lambda kv: VanillaDecoder.build_mask(None, kv, num_queries, 0, window)  # noqa: E731
        prefix_len = 0
    else:
        build = lambda kv: build_mask(kv, num_queries, prefix_len=prefix_len, window=window)  # noqa: E731
    batch, num_keys = len(key_valid), len(key_valid[0])
    heads, kv_heads, dim = 4, 2, 8
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, num_queries, dim, generator=g)
    key = torch.randn(batch, kv_heads, num_keys, dim, generator=g)
    value = torch.randn(batch, kv_heads, num_keys, dim, generator=g)
    scale = 1 / math.sqrt(dim)

    mask = build(as_tensor(key_valid))
    out = attend(query, key, value, mask, scale)
    assert out.shape == (batch, heads, num_queries, dim)
    assert not torch.isnan(out).any()

    dense = expand(mask, batch, num_queries, num_keys, prefix_len)
    reference_dense = torch.tensor(reference_mask(key_valid, num_queries, prefix_len, window), dtype=torch.bool)
    expected = explicit_attention(query, key, value, reference_dense[:, None], scale)
    for b in range(batch):
        for t in range(num_queries):
            if query_is_valid(key_valid, b, t, num_queries):
                torch.testing.assert_close(out[b, :, t], expected[b, :, t], atol=1e-5, rtol=1e-5)
    # the dense expansion of the builder's result gives the same valid-row outputs too
    via_dense = attend(query, key, value, dense, scale)
    for b in range(batch):
        for t in range(num_queries):
            if query_is_valid(key_valid, b, t, num_queries):
                torch.testing.assert_close(via_dense[b, :, t], out[b, :, t], atol=1e-5, rtol=1e-5)


def test_attend_gqa_heads_are_grouped_not_interleaved():
    """Query heads 0,1 use K/V head 0 and heads 2,3 use K/V head 1 (the repeat_interleave layout)."""
    g = torch.Generator().manual_seed(1)
    query = torch.randn(1, 4, 3, 8, generator=g)
    key = torch.randn(1, 2, 3, 8, generator=g)
    value = torch.zeros(1, 2, 3, 8)
    value[:, 0] = 1.0
    value[:, 1] = -1.0
    out = attend(query, key, value, build_mask(torch.ones(1, 3, dtype=torch.bool), 3), 0.3)
    assert torch.allclose(out[0, :2], torch.ones(2, 3, 8))
    assert torch.allclose(out[0, 2:], -torch.ones(2, 3, 8))
