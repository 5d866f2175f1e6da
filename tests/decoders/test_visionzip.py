"""`visionzip` against a reference written here one token at a time: dominant tokens by the encoder's attention,
contextual tokens merged by key similarity, before the connector; and its composition with ProxyV."""

import pytest
import torch
import torch.nn.functional as F
from tiny import VISION_KINDS, build, left_padded, pixels, prompt

from leanvlm import ImageContext, LeanVLMForConditionalGeneration
from leanvlm.data.features import FeatureCache, encode_images_to_cache, model_feature_signature
from leanvlm.data.llava import stack_features
from leanvlm.decoders.base import attention_key
from leanvlm.decoders.visionzip import VisionZipOptions, zip_tokens
from leanvlm.processing import LeanVLMProcessor
from leanvlm.vision import encode_features

LAYER = -2  # the tiny models' feature layer


def zipped_by_hand(hidden: torch.Tensor, summary: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """One crop (N, d): the `dominant` tokens of highest attention in their order, then each of `contextual` evenly
    spaced targets of the rest averaged with the other remaining tokens whose key is most cosine-similar to its."""
    score, keys = summary[:, 0].tolist(), summary[:, 1:].double()
    top = sorted(sorted(range(len(score)), key=lambda i: -score[i])[:dominant])
    rest = [i for i in range(len(score)) if i not in top]
    if contextual == 0:
        return hidden[top]
    step = max(1, len(rest) // contextual)
    targets = rest[::step][:contextual]
    groups = {t: [t] for t in targets}
    for i in rest:
        if i not in groups:
            similarity = [float(F.cosine_similarity(keys[i], keys[t], dim=0)) for t in targets]
            groups[targets[similarity.index(max(similarity))]].append(i)
    merged = [hidden[groups[t]].double().mean(dim=0).to(hidden.dtype) for t in targets]
    return torch.cat([hidden[top], torch.stack(merged)])


def batch(model, crops: int):
    """Two prompts, one with one image and one with two, each image of `crops` crops."""
    rows = [prompt(model, 5, "<image>", 7, 8), prompt(model, 9, "<image>", 10, "<image>", 11)]
    ids, mask = left_padded(rows)
    return ids, mask, pixels(3 * crops, seed=4), [crops] * 3


def features_of(model, images):
    keys = [LAYER, attention_key(LAYER)]
    with torch.no_grad():
        return encode_features(model.vision_model, images, keys, model.config.vision_feature_select)


@pytest.mark.parametrize(("tokens", "dominant", "contextual"), [(16, 4, 1), (16, 5, 3), (16, 8, 0), (16, 12, 4),
                                                                (30, 6, 5), (30, 1, 7)])
@pytest.mark.parametrize("seed", [0, 1])
def test_zip_tokens_equals_the_token_by_token_reference(tokens, dominant, contextual, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, tokens, 6, generator=generator)
    summary = torch.randn(3, tokens, 1 + 4, generator=generator)
    zipped = zip_tokens(hidden, summary, dominant, contextual)
    assert zipped.shape == (3, dominant + contextual, 6)
    for crop in range(3):
        torch.testing.assert_close(zipped[crop], zipped_by_hand(hidden[crop], summary[crop], dominant, contextual),
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize(("options", "split"), [
    ({}, (54, 10)), ({"keep_tokens": 128}, (108, 20)), ({"keep_tokens": 192}, (162, 30)),
    ({"keep_tokens": 16}, (13, 3)), ({"keep_tokens": 5}, (4, 1)), ({"keep_tokens": 3}, (3, 0)),
    ({"keep_tokens": 8, "visionzip_contextual": 3}, (5, 3)), ({"keep_ratio": 0.25}, (54, 10)),
])
def test_the_budget_splits_as_visionzip_does(options, split):
    assert VisionZipOptions(**options).resolved(3).split(256 if "keep_ratio" in options else 576) == split


@pytest.mark.parametrize("kind", VISION_KINDS)
@pytest.mark.parametrize("options", [{"keep_tokens": 5}, {"keep_tokens": 8, "visionzip_contextual": 3},
                                     {"keep_tokens": 6, "visionzip_contextual": 0}])
@pytest.mark.parametrize("crops", [1, 3])
@torch.no_grad()
def test_visionzip_equals_vanilla_fed_the_connector_of_the_zipped_features(kind, options, crops):
    vanilla = build("vanilla", vision=kind, max_crops=crops)
    zipped = build("visionzip", vision=kind, max_crops=crops, **options)
    zipped.load_state_dict(vanilla.state_dict())  # strict: vanilla's parameters under the same names
    ids, mask, images, image_crops = batch(vanilla, crops)
    features = features_of(vanilla, images)
    dominant, contextual = VisionZipOptions(**options).split(16)
    by_hand = torch.stack([zipped_by_hand(hidden, summary, dominant, contextual)
                           for hidden, summary in zip(features[LAYER], features[attention_key(LAYER)], strict=True)])
    kept = vanilla.decoder.connector(by_hand)
    context = zipped.encode_images(images, image_crops)
    assert context.grid is None
    torch.testing.assert_close(context.tokens, kept, atol=1e-6, rtol=0)
    torch.testing.assert_close(zipped(ids, mask, pixel_values=images, image_crops=image_crops).logits,
                               vanilla(ids, mask, image_context=ImageContext("vanilla", kept, image_crops)).logits,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget", [{"keep_tokens": 16}, {"keep_ratio": 1.0}])
@torch.no_grad()
def test_a_budget_of_every_token_is_exactly_vanilla(budget):
    vanilla = build("vanilla", max_crops=3)
    zipped = build("visionzip", max_crops=3, **budget)
    zipped.load_state_dict(vanilla.state_dict())
    ids, mask, images, crops = batch(vanilla, 3)
    context = zipped.encode_images(images, crops)
    assert torch.equal(context.tokens, vanilla.encode_images(images, crops).tokens) and context.grid == (4, 4)
    torch.testing.assert_close(zipped(ids, mask, pixel_values=images, image_crops=crops).logits,
                               vanilla(ids, mask, pixel_values=images, image_crops=crops).logits, atol=0, rtol=0)


@torch.no_grad()
def test_a_trained_vanilla_checkpoint_loads_into_visionzip_and_reads_its_attention(tmp_path):
    vanilla = build("vanilla", vision="clip", seed=3)
    vanilla.save_pretrained(tmp_path)
    model, info = LeanVLMForConditionalGeneration.from_pretrained(tmp_path, decoder="visionzip", keep_tokens=4,
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.feature_keys == [LAYER, attention_key(LAYER)]
    images = pixels(2)
    features = features_of(vanilla, images)
    by_hand = torch.stack([zipped_by_hand(h, s, 3, 1)
                           for h, s in zip(features[LAYER], features[attention_key(LAYER)], strict=True)])
    torch.testing.assert_close(model.eval().encode_images(images).tokens, vanilla.decoder.connector(by_hand),
                               atol=1e-6, rtol=0)


@torch.no_grad()
def test_cached_features_hold_the_attention_summary_and_give_the_same_context(tmp_path):
    from PIL import Image
    from tiny import word_tokenizer

    model = build("visionzip", vision="dinov2", keep_tokens=5)
    processor = LeanVLMProcessor.for_model(model, word_tokenizer())
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy()).save(paths[-1])
    cache = FeatureCache(str(tmp_path / "features"), model_feature_signature(model, processor))
    assert encode_images_to_cache(model.vision_model, processor, model.config.feature_keys,
                                  model.config.vision_feature_select, paths, cache) == 2
    assert all(cache.holds(path, [LAYER, attention_key(LAYER)]) for path in paths)
    features, crops = stack_features([cache.image_features(path, model.config.feature_keys) for path in paths])
    pixel_values, _ = processor.preprocess_images([Image.open(path).convert("RGB") for path in paths])
    torch.testing.assert_close(model.context_from_features(features, crops).tokens,
                               model.encode_images(pixel_values).tokens, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"lacks encoder output\(s\) \['attention-2'\]"):
        model.context_from_features({LAYER: features[LAYER]}, crops)


@pytest.mark.parametrize("crops", [1, 3])
@torch.no_grad()
def test_proxyv_over_visionzip_equals_plain_proxyv_fed_the_zipped_tokens(crops):
    plain = build("proxyv", proxyv_proxy_init="learned", proxyv_reduce_factor=2, max_crops=crops)
    composed = build("proxyv", proxyv_token_reduction="visionzip", keep_tokens=6, proxyv_proxy_init="learned",
                     proxyv_reduce_factor=2, max_crops=crops, seed=1)
    composed.load_state_dict(plain.state_dict())  # the reduction adds no parameters
    ids, mask, images, image_crops = batch(plain, crops)
    features = features_of(plain, images)
    by_hand = torch.stack([zipped_by_hand(h, s, 5, 1)
                           for h, s in zip(features[LAYER], features[attention_key(LAYER)], strict=True)])
    kept = plain.decoder.connector(by_hand)
    context = composed.encode_images(images, image_crops)
    torch.testing.assert_close(context.tokens, kept, atol=1e-6, rtol=0)
    assert context.grid is None
    torch.testing.assert_close(composed(ids, mask, pixel_values=images, image_crops=image_crops).logits,
                               plain(ids, mask, image_context=ImageContext("proxyv", kept, image_crops)).logits,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize(("options", "message"), [
    ({"tome_r": 2}, "use tome_r=0 with it"),
    ({"vision_feature_layer": 0}, "not the embeddings"),
    ({"keep_tokens": 4, "visionzip_contextual": 4}, "leaves no dominant token"),
    ({"visionzip_contextual": -1}, "visionzip_contextual must be an int >= 0"),
    ({"decoder": "vanilla", "visionzip_contextual": 2}, "visionzip_contextual: a token-reduction option"),
])
def test_visionzip_refuses_what_it_cannot_do_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        build(**{"decoder": "visionzip", "vision": "clip", **options})
