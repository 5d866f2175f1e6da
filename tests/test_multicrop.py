"""AnyRes multi-crop images: crop selection, processor output, newline placement, validation."""

import pytest
import torch
from PIL import Image
from tiny import IMAGE_SIZE, build, pixels, prompt, word_tokenizer

from leanvlm import KVCache, LeanVLMProcessor
from leanvlm.crops import best_resolution, default_pinpoints, split_into_crops, usable_pinpoints

N = 16  # tokens per crop in the tiny models


def test_grid_choice_keeps_the_most_pixels():
    pins = default_pinpoints(32)  # 32x64, 64x32, 64x64, 96x32, 32x96
    assert best_resolution((100, 40), pins) == (96, 32)
    assert best_resolution((40, 100), pins) == (32, 96)
    assert best_resolution((50, 50), pins) == (64, 64)
    assert usable_pinpoints(pins, 32, max_crops=3) == [(32, 64), (64, 32)]
    crops = split_into_crops(Image.new("RGB", (100, 40), "red"), pins, 32)
    assert len(crops) == 1 + 3 and all(c.size == (32, 32) for c in crops)
    with pytest.raises(ValueError, match="not a multiple of the crop size"):
        usable_pinpoints([[48, 32]], 32, 5)


def test_processor_reports_crops_per_image_and_the_model_places_newlines():
    model = build("vanilla", max_crops=5)
    assert model.decoder.image_newline is not None  # on by default for multi-crop
    processor = LeanVLMProcessor.for_model(model, word_tokenizer())
    images = [Image.new("RGB", (100, 40), "red"), Image.new("RGB", (50, 50), "blue")]
    batch = processor(text=["<image> what is this ?", "<image> what ?"], images=images)
    assert batch["image_crops"].tolist() == [4, 5]
    assert batch["pixel_values"].shape == (9, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    for b, crops in enumerate([4, 5]):
        valid = out.attention_mask[b]
        vision = out.vision_mask[b][valid]
        embeds = out.hidden_states[0][b][valid]
        image_start = (vision.int().argmax()).item()
        block = slice(image_start, image_start + crops * (N + 1))
        assert vision[block].tolist() == ([True] * N + [False]) * crops  # a newline closes every crop
        newlines = embeds[block][~vision[block]]
        torch.testing.assert_close(newlines, model.decoder.image_newline.expand(crops, -1))


def test_single_crop_keeps_the_llava_layout_unless_asked():
    assert build("vanilla").decoder.image_newline is None
    model = build("vanilla", image_newline=True)
    with torch.no_grad():
        out = model(torch.tensor([prompt(model, 5, "<image>", 7)]), pixel_values=pixels(1))
    assert out.vision_mask[0].tolist() == [False] + [True] * N + [False, False]


def test_declared_crops_must_match_the_pixels():
    model = build("vanilla", max_crops=3)
    with pytest.raises(ValueError, match=r"image_crops declares 4 crop\(s\) in total .* pixel_values holds 3"):
        model.encode_images(pixels(3), image_crops=[2, 2])
    with pytest.raises(ValueError, match="at most max_crops=3"):
        model.encode_images(pixels(4), image_crops=[4])
    ids = torch.tensor([prompt(model, 5, "<image>", "<image>")])
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\).*but 1 image\(s\)"):
        model(ids, pixel_values=pixels(3), image_crops=[3])


def test_himix_reads_every_crop_as_vision_keys():
    model = build("himix", max_crops=3)
    ids = torch.tensor([prompt(model, 5, "<image>", 7, 8)])
    context = model.encode_images(pixels(3), image_crops=[3])
    with torch.no_grad():
        cache = KVCache(model.config.text_config.num_hidden_layers)
        base = model(ids, image_context=context, cache=cache).logits
        assert cache.prefix_len == 3 * N
        swapped = model(ids, image_context=type(context)("himix", context.tokens[[2, 0, 1]], [3])).logits
        fewer = model(ids, image_context=model.encode_images(pixels(3)[:2], image_crops=[2])).logits
    torch.testing.assert_close(swapped, base, atol=1e-5, rtol=0)  # a set of keys: crop order does not matter
    assert (fewer - base).abs().max() > 1e-4


def test_processor_round_trip_keeps_crop_settings(tmp_path):
    model = build("vanilla", max_crops=3, image_grid_pinpoints=[[64, 32]])
    processor = LeanVLMProcessor.for_model(model, word_tokenizer())
    processor.save_pretrained(tmp_path)
    again = LeanVLMProcessor.from_pretrained(tmp_path)
    assert (again.max_crops, again.image_grid_pinpoints) == (3, [[64, 32]])
    batch = again(text=["<image> what"], images=[Image.new("RGB", (40, 90), "green")])
    assert batch["image_crops"].tolist() == [3]  # only 64x32 fits: 2 sub-crops + base


def test_crop_settings_are_checked_when_the_model_is_built():
    with pytest.raises(ValueError, match="fits max_crops=2"):
        build("vanilla", max_crops=2)  # the smallest default grid has 2 sub-crops + the base view
    with pytest.raises(ValueError, match=r"\[\[width, height\], ...\]"):
        build("vanilla", max_crops=3, image_grid_pinpoints=[[48]])
    assert build("vanilla", max_crops=2, image_grid_pinpoints=[[32, 32]]).config.max_crops == 2
