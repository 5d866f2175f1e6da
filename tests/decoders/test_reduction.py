"""The token-reduction policies (`random`, `pool`, `divprune`) against explicit references: each one's selection, the
budget rules, the image context's grid, and the model equal to vanilla fed the kept tokens by hand."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tiny import build, left_padded, pixels, prompt

from leanvlm import ImageContext, LeanVLMForConditionalGeneration
from leanvlm.decoders.divprune import max_min_diverse
from leanvlm.decoders.reduction import ReductionOptions

REDUCTIONS = ["random", "pool", "divprune"]
GRID = (4, 4)  # the tiny encoders' patch grid: 16 tokens per crop


def batch(model, crops: int):
    """Two prompts, one with one image and one with two, each image of `crops` crops."""
    rows = [prompt(model, 5, "<image>", 7, 8), prompt(model, 9, "<image>", 10, "<image>", 11)]
    ids, mask = left_padded(rows)
    return ids, mask, pixels(3 * crops, seed=4), [crops] * 3


def pooled_by_hand(tokens: torch.Tensor, grid, size) -> torch.Tensor:
    """(C, N, d) on a row-major grid -> (C, r * c, d), average-pooled with torch's adaptive pooling."""
    images = tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1]).permute(0, 3, 1, 2)  # (C, d, rows, cols)
    return F.adaptive_avg_pool2d(images, size).permute(0, 2, 3, 1).reshape(tokens.shape[0], -1, tokens.shape[-1])


def greedy_max_min(points: torch.Tensor, budget: int) -> list[int]:
    """DivPrune's rule, one comparison at a time: start with the point whose nearest other point is farthest (cosine
    distance), then add the point farthest from its nearest chosen one; first index on ties; indices ascending."""
    n = len(points)
    distance = [[1 - float(F.cosine_similarity(points[i], points[j], dim=0)) for j in range(n)] for i in range(n)]
    chosen = [max(range(n), key=lambda j: min(distance[i][j] for i in range(n) if i != j))]
    while len(chosen) < budget:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: min(distance[i][j] for i in chosen)))
    return sorted(chosen)


def selected_by_hand(name: str, tokens: torch.Tensor, budget: int, seed: int = 0):
    """What each policy keeps of (C, N, d) tokens on the tiny grid, and their grid, computed here."""
    if name == "random":
        positions = torch.randperm(tokens.shape[1], generator=torch.Generator().manual_seed(seed))[:budget]
        return tokens[:, positions.sort().values], None
    if name == "pool":
        side = math.isqrt(budget)
        return pooled_by_hand(tokens, GRID, (side, side)), (side, side)
    return torch.stack([crop[greedy_max_min(crop.double(), budget)] for crop in tokens]), None


@pytest.mark.parametrize("budget", [{"keep_tokens": 16}, {"keep_tokens": 64}, {"keep_ratio": 1.0}])
@pytest.mark.parametrize("name", REDUCTIONS)
@torch.no_grad()
def test_a_budget_of_every_token_is_exactly_vanilla(name, budget):
    vanilla = build("vanilla", max_crops=3)
    reduced = build(name, max_crops=3, **budget)
    reduced.load_state_dict(vanilla.state_dict())  # strict: the same parameters under the same names
    ids, mask, images, crops = batch(vanilla, 3)
    context = reduced.encode_images(images, crops)
    assert torch.equal(context.tokens, vanilla.encode_images(images, crops).tokens) and context.grid == GRID
    torch.testing.assert_close(reduced(ids, mask, pixel_values=images, image_crops=crops).logits,
                               vanilla(ids, mask, pixel_values=images, image_crops=crops).logits, atol=0, rtol=0)


@pytest.mark.parametrize("crops", [1, 3])  # 3: a base view and sub-crops, each followed by a newline
@pytest.mark.parametrize("name", REDUCTIONS)
@torch.no_grad()
def test_a_small_budget_equals_vanilla_fed_the_kept_tokens(name, crops):
    vanilla = build("vanilla", max_crops=crops)
    reduced = build(name, max_crops=crops, keep_tokens=4)
    reduced.load_state_dict(vanilla.state_dict())
    ids, mask, images, image_crops = batch(vanilla, crops)
    kept, grid = selected_by_hand(name, vanilla.encode_images(images, image_crops).tokens, 4)
    assert kept.shape[1] == 4
    by_hand = ImageContext("vanilla", kept, image_crops, grid)
    context = reduced.encode_images(images, image_crops)
    assert context.grid == grid
    torch.testing.assert_close(context.tokens, kept, atol=1e-6, rtol=0)
    torch.testing.assert_close(reduced(ids, mask, pixel_values=images, image_crops=image_crops).logits,
                               vanilla(ids, mask, image_context=by_hand).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grid,budget,size", [((4, 6), 4, (2, 2)), ((4, 6), 9, (3, 3)), ((4, 6), 8, (2, 2)),
                                              ((4, 6), 20, (4, 4)), ((3, 3), 5, (2, 2))])
def test_pool_equals_adaptive_average_pooling_of_the_grid(grid, budget, size):
    decoder = build("pool", keep_tokens=budget).decoder
    tokens = torch.randn(3, grid[0] * grid[1], 8, generator=torch.Generator().manual_seed(budget))
    pooled, pooled_grid = decoder.reduce_tokens(tokens, grid)
    assert pooled_grid == size
    torch.testing.assert_close(pooled, pooled_by_hand(tokens, grid, size), atol=1e-6, rtol=0)


def test_pool_reads_the_grid_of_non_square_crops():
    model = build("pool", vision="dinov2", keep_tokens=4)  # DINOv2 takes 32 x 48 pixels as a 4 x 6 grid
    vanilla = build("vanilla", vision="dinov2")
    vanilla.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    context = model.encode_images(images)
    assert context.grid == (2, 2)
    expected = pooled_by_hand(vanilla.encode_images(images).tokens, (4, 6), (2, 2))
    torch.testing.assert_close(context.tokens, expected, atol=1e-6, rtol=0)


def test_pool_refuses_tokens_that_form_no_grid():
    model = build("pool", keep_tokens=4)
    with pytest.raises(ValueError, match="no known grid"):
        model.decoder.reduce_tokens(torch.randn(2, 16, 32), None)
    features = {-2: torch.randn(1, 15, 24)}  # 15 tokens: no square grid to assume
    with pytest.raises(ValueError, match="pool decoder averages each crop's patch grid"):
        model.context_from_features(features)
    assert model.context_from_features(features, grid=(3, 5)).grid == (2, 2)
    with pytest.raises(ValueError, match="tome_r=1 merges"):
        build("pool", tome_r=1)


def test_random_keeps_the_same_positions_for_every_crop_and_call():
    def kept_positions(seed: int) -> torch.Tensor:
        decoder = build("random", keep_tokens=5, random_seed=seed).decoder
        crop, position = torch.meshgrid(torch.arange(4.0), torch.arange(16.0), indexing="ij")
        tokens = torch.stack([crop, position], dim=-1)  # (4 crops, 16, 2): each token names its crop and position
        kept, grid = decoder.reduce_tokens(tokens, GRID)
        assert grid is None and torch.equal(kept[..., 0], crop[:, :5])
        return kept[..., 1].long()

    positions = kept_positions(0)
    assert (positions == positions[0]).all(), "every crop keeps the same positions"
    assert positions[0].tolist() == sorted(set(positions[0].tolist())), "distinct, in spatial order"
    assert torch.equal(kept_positions(0), positions), "the same positions on every call and model"
    assert not torch.equal(kept_positions(1), positions), "another seed draws another subset"
    model = build("random", keep_tokens=5)
    images = pixels(3, seed=5)
    with torch.no_grad():  # an image keeps the same tokens alone and in a batch
        torch.testing.assert_close(model.encode_images(images[1:2]).tokens, model.encode_images(images).tokens[1:2])


@pytest.mark.parametrize("budget", [1, 2, 5, 15])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_divprune_equals_the_greedy_max_min_reference(seed, budget):
    decoder = build("divprune", keep_tokens=budget).decoder
    tokens = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(seed))
    kept, grid = decoder.reduce_tokens(tokens, GRID)
    assert grid is None
    expected = torch.stack([crop[greedy_max_min(crop.double(), budget)] for crop in tokens])
    assert torch.equal(kept, expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_divprune_is_within_half_of_the_most_diverse_subset(data):
    """Greedy farthest-point selection is a 2-approximation of max-min diversity in a metric. Cosine distance is none,
    but it orders pairs as the Euclidean distance between the normalised tokens does (1 - cos = |u - v|^2 / 2), so
    the greedy subset's smallest such distance is at least half the best subset's (a quarter in 1 - cos)."""
    n, dim = data.draw(st.integers(4, 8)), data.draw(st.integers(2, 4))
    budget = data.draw(st.integers(2, n - 1))
    values = data.draw(st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=n * dim, max_size=n * dim))
    tokens = torch.tensor(values).view(n, dim)
    assume(bool((tokens.norm(dim=1) > 0.1).all()))
    unit = F.normalize(tokens.double(), dim=1)

    def spread(subset) -> float:
        return min(float((unit[i] - unit[j]).norm()) for i, j in itertools.combinations(subset, 2))

    best = max(spread(subset) for subset in itertools.combinations(range(n), budget))
    assert spread(max_min_diverse(tokens[None], budget)[0].tolist()) >= best / 2 - 1e-6


@pytest.mark.parametrize("options,tokens,kept", [
    ({}, 576, 64), ({}, 16, 16), ({"keep_tokens": 5}, 16, 5), ({"keep_ratio": 0.25}, 16, 4),
    ({"keep_ratio": 0.1}, 16, 2), ({"keep_ratio": 0.5}, 9, 5), ({"keep_ratio": 0.01}, 16, 1),
    ({"keep_ratio": 1.0}, 729, 729),
])
def test_the_budget_is_a_count_or_a_fraction_of_the_crop(options, tokens, kept):
    assert ReductionOptions(**options).resolved(3).budget(tokens) == kept


@pytest.mark.parametrize("options,message", [
    ({"keep_tokens": 0}, "keep_tokens must be an int >= 1"),
    ({"keep_tokens": 2.5}, "keep_tokens must be an int >= 1"),
    ({"keep_ratio": 0}, r"keep_ratio must be a fraction in \(0, 1\]"),
    ({"keep_ratio": 1.5}, r"keep_ratio must be a fraction in \(0, 1\]"),
    ({"keep_tokens": 8, "keep_ratio": 0.5}, "both set the budget; set one of them"),
    ({"random_seed": -1}, "random_seed must be an int >= 0"),
])
def test_bad_budgets_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        build("random", **options)


@pytest.mark.parametrize("name", REDUCTIONS)
@torch.no_grad()
def test_a_trained_vanilla_checkpoint_loads_into_a_reduction(name, tmp_path):
    vanilla = build("vanilla", seed=3)
    vanilla.save_pretrained(tmp_path)
    ids, mask, images, _ = batch(vanilla, 1)
    whole, info = LeanVLMForConditionalGeneration.from_pretrained(tmp_path, decoder=name, keep_tokens=16,
                                                                  output_loading_info=True)
    assert whole.config.decoder == name and whole.config.keep_tokens == 16
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(whole.eval()(ids, mask, pixel_values=images).logits,
                               vanilla(ids, mask, pixel_values=images).logits, atol=0, rtol=0)
    small = LeanVLMForConditionalGeneration.from_pretrained(tmp_path, decoder=name, keep_tokens=4).eval()
    kept, _ = selected_by_hand(name, vanilla.encode_images(images).tokens, 4)
    torch.testing.assert_close(small.encode_images(images).tokens, kept, atol=1e-6, rtol=0)
