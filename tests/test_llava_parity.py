"""`vanilla` equals Hugging Face's `LlavaForConditionalGeneration` with the same weights."""

import pytest
import torch
from tiny import VOCAB, pixels, text_config, vision_config
from transformers import LlavaConfig, LlavaForConditionalGeneration

from leanvlm import LeanVLMForConditionalGeneration

IMAGE_ID = VOCAB - 1  # HF Llava keeps the image token inside the vocabulary


def tiny_llava(vision="clip", strategy="default", seed=0):
    torch.manual_seed(seed)
    config = LlavaConfig(
        text_config=text_config("llama"),
        vision_config=vision_config(vision),
        image_token_index=IMAGE_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
    )
    return LlavaForConditionalGeneration(config).eval()


def expanded(ids, tokens_per_image):
    """HF Llava input: each placeholder repeated once per vision token."""
    out = []
    for token in ids:
        out += [token] * (tokens_per_image if token == IMAGE_ID else 1)
    return out


# 16 patches; CLIP adds a CLS token; LLaVA's "default" drops token 0 even on SigLIP, which has no CLS.
@pytest.mark.parametrize(
    "vision,strategy,tokens_per_image", [("clip", "default", 16), ("siglip", "default", 15), ("clip", "full", 17)]
)
def test_vanilla_logits_equal_hf_llava(vision, strategy, tokens_per_image):
    llava = tiny_llava(vision, strategy)
    ours = LeanVLMForConditionalGeneration.from_llava(llava).eval()
    assert ours.config.image_token_id == IMAGE_ID
    assert ours.language_model.lm_head.weight is llava.lm_head.weight  # imported without a copy
    ids = [[5, IMAGE_ID, 7, 8, 9], [11, IMAGE_ID, 12, 13, 14]]
    images = pixels(2)
    with torch.no_grad():
        assert ours.encode_images(images).tokens.shape[1] == tokens_per_image
        hf = llava(input_ids=torch.tensor([expanded(r, tokens_per_image) for r in ids]), pixel_values=images).logits
        mine = ours(torch.tensor(ids), pixel_values=images).logits
    assert mine.shape == hf.shape
    torch.testing.assert_close(mine, hf, atol=1e-5, rtol=0)


def test_from_llava_directory_and_generation_match(tmp_path):
    llava = tiny_llava()
    llava.save_pretrained(tmp_path)
    ours = LeanVLMForConditionalGeneration.from_llava(tmp_path).eval()
    ids = torch.tensor([[5, IMAGE_ID, 7, 8]])
    images = pixels(1)
    with torch.no_grad():
        hf_ids = torch.tensor([expanded(ids[0].tolist(), 16)])
        hf = llava.generate(input_ids=hf_ids, pixel_values=images, max_new_tokens=6, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    mine = ours.generate(ids, pixel_values=images, max_new_tokens=6, eos_token_id=[])
    assert mine[0, ids.shape[1]:].tolist() == hf[0, hf_ids.shape[1]:].tolist()


def test_from_llava_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LeanVLMForConditionalGeneration.from_llava(tmp_path / "nope")
