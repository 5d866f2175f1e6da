"""Tiny random configs, tokenizers and helpers shared by the tests (no downloads)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    Dinov2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    SiglipVisionConfig,
)

VOCAB = 96
IMAGE_SIZE = 32
PATCH = 8  # 4 x 4 = 16 patches per image

_TEXT_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def text_config(family: str = "llama"):
    if family == "llama":
        return LlamaConfig(**_TEXT_COMMON)
    if family == "llama3":  # Llama-3 rope scaling, as SmolLM2/Llama-3.2 checkpoints use
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return LlamaConfig(**_TEXT_COMMON, rope_parameters=rope, tie_word_embeddings=True)
    if family == "qwen2":
        return Qwen2Config(**_TEXT_COMMON)
    if family == "mistral":
        return MistralConfig(**{**_TEXT_COMMON, "sliding_window": 7})
    if family == "qwen3":
        return Qwen3Config(**_TEXT_COMMON, head_dim=8)
    raise KeyError(family)


TEXT_FAMILIES = ("llama", "llama3", "qwen2", "mistral", "qwen3")


def vision_config(kind: str = "siglip"):
    common = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    if kind == "siglip":
        return SiglipVisionConfig(**common)
    if kind == "clip":
        return CLIPVisionConfig(**common)
    if kind == "dinov2":
        return Dinov2Config(**common)
    raise KeyError(kind)


VISION_KINDS = ("siglip", "clip", "dinov2")


def build(decoder: str = "vanilla", text: str = "llama", vision: str = "siglip", seed: int = 0, **options):
    from leanvlm import LeanVLMForConditionalGeneration

    torch.manual_seed(seed)
    model = LeanVLMForConditionalGeneration.from_parts(
        language_model=text_config(text), vision_model=vision_config(vision), decoder=decoder, **options
    )
    return model.eval()


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def prompt(model, *pieces) -> list[int]:
    """Token ids from ints and the string "<image>"."""
    return [model.config.image_token_id if p == "<image>" else p for p in pieces]


@torch.no_grad()
def recomputed(model, ids, mask, new, **images):
    """Next-token logits (B, n + 1, V) after the prompt and after each token of `new` (B, n), computed without
    stepping: one forward over prompt + new. Where the tokens a policy drops depend on the forward's last token
    (`ranks_by_last_token`), that forward would rank by another token; the computation cached decoding continues is
    then the prompt's prefill followed by one cached block of all of `new`."""
    from leanvlm.decoders import DECODERS

    if DECODERS[model.config.decoder].ranks_by_last_token:
        cache = model.new_cache()
        first = model(ids, mask, cache=cache, **images).logits[:, -1:]
        return torch.cat([first, model(new, cache=cache).logits], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(new, dtype=mask.dtype)], dim=1)
    return model(torch.cat([ids, new], dim=1), full_mask, **images).logits[:, -(new.shape[1] + 1) :]


@torch.no_grad()
def cached_and_recomputed(model, ids, mask, new, **images):
    """Next-token logits two ways: a cached prefill then one cached step per token of `new` (B, n), and
    `recomputed`. Returns (stepped (B, n + 1, V), recomputed (B, n + 1, V), the cache)."""
    from leanvlm import KVCache

    cache = KVCache(model.config.text_config.num_hidden_layers)
    steps = [model(ids, mask, cache=cache, **images).logits[:, -1]]
    for t in range(new.shape[1]):
        steps.append(model(new[:, t : t + 1], cache=cache).logits[:, -1])
    return torch.stack(steps, dim=1), recomputed(model, ids, mask, new, **images), cache


def left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = torch.tensor(r)
        mask[i, length - len(r):] = 1
    return ids, mask


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bpe_tokenizer(corpus=("What color is the square? red blue green", "How many circles? two three",
                          "USER: ASSISTANT:\ncaption")):
    """A small byte-level BPE tokenizer trained on `corpus`, with pad/bos/eos, chat-template special tokens and a
    ChatML template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=90, special_tokens=[
        "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHATML
    return tokenizer


def word_tokenizer():
    """A word-level tokenizer for prompts like "<image> what is this ?"."""
    words = ["<pad>", "<s>", "</s>", "<unk>", "what", "is", "this", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
