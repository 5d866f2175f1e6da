"""`LeanVLMProcessor`: tokenizer + image processor, with a word-level tokenizer built in memory (no downloads)."""

from __future__ import annotations

import re

import pytest
import tiny
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from leanvlm.processing import LeanVLMProcessor

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "what", "color", "is", "the", "square", "?", "how", "many", "circles",
         "red", "blue"]
WORD_ID = {w: i for i, w in enumerate(WORDS)}
PAD_ID = WORD_ID["<pad>"]

TEXTS = ["<image> what color is the square ?", "how many <image> circles"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(dict(WORD_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def expected_ids(text: str, image_id: int) -> list[int]:
    """Independent tokenisation of the test prompts: one id per space-separated word."""
    return [image_id if w == "<image>" else WORD_ID[w] for w in text.split(" ")]


@pytest.fixture
def tokenizer():
    return make_tokenizer()  # fresh per test: the processor adds <image> to it


@pytest.fixture
def images():
    red = Image.new("RGB", (50, 40), (255, 0, 0))
    blue = Image.new("RGB", (23, 61), (0, 0, 255))
    return red, blue


@pytest.fixture(scope="module")
def models_by_kind():
    return {kind: tiny.build("vanilla", vision=kind) for kind in tiny.VISION_KINDS}


def check_redness(pixel_values: torch.Tensor, reds: list[bool]):
    """A red image has a higher normalised red than blue channel, a blue one the reverse (whatever the mean/std)."""
    for i, red in enumerate(reds):
        r, b = pixel_values[i, 0].mean(), pixel_values[i, 2].mean()
        assert (r > b) if red else (b > r), f"image {i} is in the wrong place"


# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", tiny.VISION_KINDS)
def test_batch_is_left_padded_with_model_placeholder(models_by_kind, tokenizer, images, kind):
    model = models_by_kind[kind]
    processor = LeanVLMProcessor.for_model(model, tokenizer)
    image_id = model.config.image_token_id
    batch = processor(text=TEXTS, images=list(images))

    rows = [expected_ids(t, image_id) for t in TEXTS]
    length = max(len(r) for r in rows)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (2, length)
    for b, row in enumerate(rows):
        pad = length - len(row)
        assert ids[b].tolist() == [PAD_ID] * pad + row
        assert mask[b].tolist() == [0] * pad + [1] * len(row)
    assert mask[0].all() and not mask[1, :3].any()  # the longer prompt is unpadded, the shorter padded left

    # exactly one placeholder per row, where the prompt put it
    assert (ids == image_id).sum(dim=1).tolist() == [1, 1]
    assert (ids[0] == image_id).nonzero().flatten().tolist() == [0]
    assert (ids[1] == image_id).nonzero().flatten().tolist() == [3 + 2]

    assert batch["pixel_values"].shape == (2, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    assert batch["pixel_values"].dtype == torch.float32
    check_redness(batch["pixel_values"], [True, False])


@pytest.mark.parametrize("kind", tiny.VISION_KINDS)
def test_images_per_sample_lists_give_the_same_batch(models_by_kind, tokenizer, images, kind):
    processor = LeanVLMProcessor.for_model(models_by_kind[kind], tokenizer)
    red, blue = images
    flat = processor(text=TEXTS, images=[red, blue])
    nested = processor(text=TEXTS, images=[[red], [blue]])
    assert set(flat.keys()) == set(nested.keys())
    for key in flat:
        assert torch.equal(flat[key], nested[key]), key

    # two images in the first sample: nested and flat order agree and follow the placeholders
    texts = ["<image> <image> what color", "<image> how many circles"]
    flat = processor(text=texts, images=[blue, red, red])
    nested = processor(text=texts, images=[[blue, red], [red]])
    assert torch.equal(flat["pixel_values"], nested["pixel_values"])
    assert flat["pixel_values"].shape[0] == 3
    check_redness(flat["pixel_values"], [False, True, True])


def test_placeholder_id_is_the_models_not_the_tokenizers(models_by_kind, tokenizer, images):
    model = models_by_kind["siglip"]
    processor = LeanVLMProcessor.for_model(model, tokenizer)
    tokenizer_image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert tokenizer_image_id == len(WORDS)  # added after the word list
    assert model.config.image_token_id == tiny.VOCAB
    assert tokenizer_image_id != model.config.image_token_id

    ids = processor(text=TEXTS, images=list(images))["input_ids"]
    assert (ids == model.config.image_token_id).sum() == 2
    assert (ids == tokenizer_image_id).sum() == 0

    # decoding maps the model's placeholder back to the text "<image>"
    decoded = processor.decode(ids[0])
    assert "<image>" in decoded and "square" in decoded
    assert processor.batch_decode(ids, skip_special_tokens=True)[1].split() == ["how", "many", "circles"]


def test_from_parts_without_model_id_uses_tokenizer_id(tokenizer, images):
    processor = LeanVLMProcessor.from_parts(tokenizer, vision_config=tiny.vision_config("siglip"))
    ids = processor(text=TEXTS, images=list(images))["input_ids"]
    assert (ids == len(WORDS)).sum() == 2


@pytest.mark.parametrize(
    "texts, n_images",
    [
        (["<image> <image> what color"], 1),
        (["what color is the square ?"], 1),
        (["<image> what color", "how many circles"], 2),
        (["<image> what", "<image> how many <image> circles"], 1),
    ],
)
def test_count_mismatch_names_both_counts(models_by_kind, tokenizer, images, texts, n_images):
    processor = LeanVLMProcessor.for_model(models_by_kind["siglip"], tokenizer)
    n_placeholders = sum(t.split(" ").count("<image>") for t in texts)
    red, _ = images
    with pytest.raises(ValueError) as info:
        processor(text=texts, images=[red] * n_images)
    message = str(info.value)
    assert re.search(rf"\b{n_placeholders}\b", message), message
    assert re.search(rf"\b{n_images}\b", message), message


def test_text_only_batch_has_no_pixel_values(models_by_kind, tokenizer):
    processor = LeanVLMProcessor.for_model(models_by_kind["siglip"], tokenizer)
    batch = processor(text="how many circles")
    assert "pixel_values" not in batch
    assert batch["input_ids"].tolist() == [[WORD_ID["how"], WORD_ID["many"], WORD_ID["circles"]]]


@pytest.mark.parametrize("decoder", ["vanilla", "himix"])
def test_generate_end_to_end(tokenizer, images, decoder):
    model = tiny.build(decoder)
    processor = LeanVLMProcessor.for_model(model, tokenizer)
    batch = processor(text=TEXTS, images=list(images))
    length = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_new_tokens=3)
    assert out.shape == (2, length + 3)
    assert torch.equal(out[:, :length], batch["input_ids"])
    assert not (out[:, length:] == model.config.image_token_id).any()
    texts = processor.batch_decode(out, skip_special_tokens=True)
    assert isinstance(texts, list) and len(texts) == 2
    assert all(isinstance(t, str) for t in texts)


@pytest.mark.parametrize("kind", tiny.VISION_KINDS)
def test_save_and_load_round_trip(models_by_kind, tokenizer, images, tmp_path, kind):
    model = models_by_kind[kind]
    processor = LeanVLMProcessor.for_model(model, tokenizer)
    processor.save_pretrained(str(tmp_path))
    loaded = LeanVLMProcessor.from_pretrained(str(tmp_path))
    assert loaded.image_token_id == model.config.image_token_id

    before = processor(text=TEXTS, images=list(images))
    after = loaded(text=TEXTS, images=list(images))
    assert torch.equal(before["input_ids"], after["input_ids"])
    assert torch.equal(before["attention_mask"], after["attention_mask"])
    assert before["pixel_values"].shape == after["pixel_values"].shape
    assert torch.equal(before["pixel_values"], after["pixel_values"])


def test_from_pretrained_on_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        LeanVLMProcessor.from_pretrained(str(tmp_path))


def test_from_parts_needs_image_processor_or_vision_config(tokenizer):
    with pytest.raises(ValueError):
        LeanVLMProcessor.from_parts(tokenizer)
