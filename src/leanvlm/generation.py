"""Batched generation with leanvlm's KV cache: greedy or sampled (temperature / top-k / top-p)."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from leanvlm.decoders.cache import KVCache
from leanvlm.decoders.llm import decoder_layers


def _as_list(token_ids) -> list[int]:
    if token_ids is None:
        return []
    return [token_ids] if isinstance(token_ids, int) else list(token_ids)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_context=None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    streamer=None,
) -> torch.Tensor:
    """Generate up to `max_new_tokens` for every prompt of a (left-padded) batch.

    Returns `input_ids` followed by the new tokens, (B, L + n); a sample that produced an end-of-sequence token is
    filled with `pad_token_id` afterwards. Defaults for eos/pad come from the model's generation config (the LLM's,
    with e.g. an instruct model's end-of-turn ids), then from the language model's config.
    `streamer` follows transformers' streamer protocol (`put`, `end`).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    defaults = [model.generation_config, model.config.text_config]  # the LLM's generation config comes first
    if eos_token_id is None:
        eos_token_id = next((c.eos_token_id for c in defaults if c.eos_token_id is not None), None)
    eos = _as_list(eos_token_id)
    if pad_token_id is None:
        pad_token_id = next((c.pad_token_id for c in defaults if c.pad_token_id is not None), eos[0] if eos else 0)
    warpers = LogitsProcessorList()
    if do_sample:
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))

    cache = KVCache(len(decoder_layers(model.language_model)), reserve=max_new_tokens)
    logits = model(
        input_ids, attention_mask, pixel_values, image_context, cache=cache, logits_to_keep=1
    ).logits[:, -1]
    image_token_id = model.config.image_token_id  # a placeholder, never an answer
    if streamer is not None:
        streamer.put(input_ids.cpu())
    eos_tensor = torch.tensor(eos, device=input_ids.device, dtype=torch.long)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for step in range(max_new_tokens):
        logits[:, image_token_id] = float("-inf")
        if do_sample:
            scores = warpers(input_ids, logits.float())
            next_tokens = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            next_tokens = logits.argmax(dim=-1)
        next_tokens = torch.where(finished, pad_token_id, next_tokens)
        new_tokens.append(next_tokens)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        finished |= torch.isin(next_tokens, eos_tensor)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = model.decode_step(next_tokens, cache)
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
