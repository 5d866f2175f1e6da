"""`proxyv` over a token-reduced set (`proxyv_token_reduction`): exactly plain proxyv at a budget of every token,
plain proxyv fed the kept tokens by hand at a smaller one, and the option combinations it refuses."""

import json

import pytest
import torch
from tiny import build, left_padded, pixels, prompt

from leanvlm import ImageContext, LeanVLMForConditionalGeneration
from leanvlm.decoders import DECODERS
from leanvlm.measure.flops import decoder_flops

GRID = (4, 4)  # the tiny encoders' patch grid: 16 tokens per crop
# (reduction, proxies, budget and proxy options, the kept tokens' grid); learned proxies number 2x2 with factor 2,
# sized by the 4x4 grid
CASES = [
    ("pool", "spatial", {"keep_tokens": 4}, (2, 2)),  # one proxy
    ("pool", "spatial", {"keep_ratio": 0.6, "proxyv_reduce_factor": 2}, (3, 3)),  # 10 tokens pool to 3x3, one proxy
    ("pool", "learned", {"keep_tokens": 9, "proxyv_reduce_factor": 2}, (3, 3)),
    ("random", "learned", {"keep_tokens": 5, "random_seed": 3, "proxyv_reduce_factor": 2}, None),
    ("divprune", "learned", {"keep_tokens": 6, "proxyv_reduce_factor": 2}, None),
]


def composed_and_plain(reduction: str, init: str, options: dict, crops: int = 1):
    """A proxyv model that reduces the tokens, and plain proxyv with the same weights."""
    plain_options = {k: v for k, v in options.items() if k.startswith("proxyv_")}
    plain = build("proxyv", proxyv_proxy_init=init, max_crops=crops, **plain_options)
    composed = build("proxyv", proxyv_token_reduction=reduction, proxyv_proxy_init=init, max_crops=crops,
                     seed=1, **options)
    composed.load_state_dict(plain.state_dict())  # strict: the reduction adds no parameters
    return composed, plain


def batch(model, crops: int):
    """Two prompts, one with one image and one with two, each image of `crops` crops."""
    rows = [prompt(model, 5, "<image>", 7, 8), prompt(model, 9, "<image>", 10, "<image>", 11)]
    ids, mask = left_padded(rows)
    return ids, mask, pixels(3 * crops, seed=4), [crops] * 3


@pytest.mark.parametrize("budget", [{"keep_tokens": 16}, {"keep_ratio": 1.0}])
@pytest.mark.parametrize("reduction,init,options,_", CASES)
@torch.no_grad()
def test_a_budget_of_every_token_is_exactly_plain_proxyv(reduction, init, options, _, budget):
    proxy_options = {k: v for k, v in options.items() if k.startswith("proxyv_")}
    composed, plain = composed_and_plain(reduction, init, {**proxy_options, **budget}, crops=3)
    ids, mask, images, crops = batch(plain, 3)
    context = composed.encode_images(images, crops)
    assert torch.equal(context.tokens, plain.encode_images(images, crops).tokens) and context.grid == GRID
    torch.testing.assert_close(composed(ids, mask, pixel_values=images, image_crops=crops).logits,
                               plain(ids, mask, pixel_values=images, image_crops=crops).logits, atol=0, rtol=0)


@pytest.mark.parametrize("crops", [1, 3])
@pytest.mark.parametrize("reduction,init,options,kept_grid", CASES)
@torch.no_grad()
def test_a_budget_equals_plain_proxyv_fed_the_kept_tokens(reduction, init, options, kept_grid, crops):
    composed, plain = composed_and_plain(reduction, init, options, crops)
    ids, mask, images, image_crops = batch(plain, crops)
    policy = DECODERS[reduction]
    budget = policy.options_from(composed.config)
    tokens = plain.encode_images(images, image_crops).tokens  # every projected token
    kept, grid = policy.select(tokens, GRID, budget.budget(tokens.shape[1]), budget)
    assert kept.shape[1] < tokens.shape[1] and grid == kept_grid
    context = composed.encode_images(images, image_crops)
    assert torch.equal(context.tokens, kept) and context.grid == grid
    by_hand = ImageContext("proxyv", kept, image_crops, grid)
    out = composed(ids, mask, pixel_values=images, image_crops=image_crops)
    assert out.vision_mask.sum().item() == 3 * crops * kept.shape[1]
    torch.testing.assert_close(out.logits, plain(ids, mask, image_context=by_hand).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("reduction", ["random", "divprune"])
def test_spatial_proxies_refuse_a_reduction_that_forms_no_grid(reduction, tmp_path):
    refusal = (f"proxyv_token_reduction='{reduction}' keeps a set of tokens that forms no patch grid.*use "
               "proxyv_proxy_init='learned', or proxyv_token_reduction='pool'")
    with pytest.raises(ValueError, match=refusal):
        build("proxyv", proxyv_token_reduction=reduction, keep_tokens=5)
    build("proxyv", proxyv_start_layer=1).save_pretrained(tmp_path)  # a spatial checkpoint, reduced when loaded
    with pytest.raises(ValueError, match="forms no patch grid"):
        LeanVLMForConditionalGeneration.from_pretrained(tmp_path, proxyv_token_reduction=reduction)
    loaded = LeanVLMForConditionalGeneration.from_pretrained(tmp_path, proxyv_token_reduction="pool", keep_tokens=4)
    assert loaded.encode_images(pixels(1)).grid == (2, 2)


@pytest.mark.parametrize("options,message", [
    ({"keep_tokens": 8}, r"keep_tokens: an option of proxyv_token_reduction='random' or 'pool' or 'divprune' or "
                         "'visionzip', but it is None"),
    ({"keep_ratio": 0.5}, "keep_ratio: an option of proxyv_token_reduction="),
    ({"proxyv_token_reduction": "pool", "random_seed": 2}, "random_seed: an option of proxyv_token_reduction='random', "
                                                           "but it is 'pool'"),
    ({"proxyv_token_reduction": "fastv"}, "proxyv_token_reduction='fastv' is not one of 'random', 'pool', "
                                          "'divprune', 'visionzip'"),
    ({"proxyv_token_reduction": "pool", "keep_tokens": 0}, "keep_tokens must be an int >= 1"),
    ({"proxyv_token_reduction": "pool", "keep_tokens": 8, "keep_ratio": 0.5}, "both set the budget"),
])
def test_a_budget_needs_a_reduction_that_reads_it(options, message):
    """A model refuses budget options its reduction never reads; a cost estimate, which hands one set of options to
    every decoder, ignores them."""
    with pytest.raises(ValueError, match=message):
        build("proxyv", **options)
    if "proxyv_token_reduction" not in options:
        assert (decoder_flops("qwen2-0.5b", "clip-l-336", 64, "proxyv", **options)
                == decoder_flops("qwen2-0.5b", "clip-l-336", 64, "proxyv"))


def test_learned_proxies_are_sized_by_the_encoder_grid_and_take_the_kept_tokens():
    model = build("proxyv", proxyv_token_reduction="divprune", keep_tokens=6, proxyv_proxy_init="learned",
                  proxyv_reduce_factor=2, proxyv_start_layer=1).train()
    assert model.decoder.proxy_init.queries.shape[0] == 4  # the 4x4 grid's 2x2, whatever the budget
    ids = torch.tensor([prompt(model, 5, "<image>", 7, 8)])
    out = model(ids, pixel_values=pixels(1), labels=ids)
    assert out.vision_mask.sum().item() == 6
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.proxy_init.parameters())
    with pytest.raises(ValueError, match=r"keeps 3 tokens per crop, fewer than the 4 learned proxies"):
        build("proxyv", proxyv_token_reduction="random", keep_tokens=3, proxyv_proxy_init="learned",
              proxyv_reduce_factor=2)
    dinov2 = build("proxyv", vision="dinov2", proxyv_token_reduction="random", keep_tokens=5,
                   proxyv_proxy_init="learned")
    with pytest.raises(ValueError, match=r"built for 16 tokens per crop .* the crops have 36"):  # before the cut
        dinov2.encode_images(torch.randn(1, 3, 48, 48))


@torch.no_grad()
def test_save_and_load_keep_the_reduction(tmp_path):
    model = build("proxyv", proxyv_token_reduction="random", keep_tokens=5, random_seed=7, proxyv_proxy_init="learned")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["proxyv_token_reduction"], saved["keep_tokens"], saved["random_seed"]) == ("random", 5, 7)
    loaded = LeanVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.proxyv_token_reduction == "random" and loaded.config.random_seed == 7
    ids, mask, images, _ = batch(model, 1)
    assert torch.equal(loaded.encode_images(images).tokens, model.encode_images(images).tokens)
    torch.testing.assert_close(loaded(ids, mask, pixel_values=images).logits,
                               model(ids, mask, pixel_values=images).logits, atol=0, rtol=0)
    plain = LeanVLMForConditionalGeneration.from_pretrained(tmp_path, proxyv_token_reduction=None, keep_tokens=64,
                                                            random_seed=0)
    assert plain.encode_images(images).tokens.shape[1] == 16
