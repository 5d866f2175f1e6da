"""Generation in pieces a server can drive: `SamplingParams` (how to pick tokens, when a row ends), the pure `sample`
(logits -> next tokens) and `finish` (stop tokens), and `generate_steps`, which prefills a batch and yields every
row's next token step by step. `generate` collects those steps into prompt + new tokens."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch


def _as_tuple(token_ids) -> tuple[int, ...] | None:
    if token_ids is None:
        return None
    return (int(token_ids),) if isinstance(token_ids, int) else tuple(int(t) for t in token_ids)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 20
    do_sample: bool = False  # False: greedy (argmax), and the sampling fields below are unused
    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely tokens (None or 0: all)
    top_p: float | None = None  # keep the fewest most likely tokens whose probability reaches top_p (None or 1: all)
    stop_token_ids: tuple[int, ...] | None = None  # a row ends with the first of these; None: the model's eos ids
    pad_token_id: int | None = None  # fills a row after it ended; None: the model's pad id, else the first stop id
    suppress_token_ids: tuple[int, ...] = ()  # never produced (`with_model_defaults` adds the <image> placeholder)
    seed: int | None = None  # seeds the sampling generator when the caller passes none

    def __post_init__(self):
        # ints and lists are accepted for the id fields; stored as tuples, so the params stay hashable
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids))
        object.__setattr__(self, "suppress_token_ids", _as_tuple(self.suppress_token_ids) or ())
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}; use do_sample=False "
                             "for greedy decoding.")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None: no limit), got {self.top_k}.")
        if self.top_p is not None and not 0 <= self.top_p <= 1:  # 0 keeps the most likely token, as transformers
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}.")

    def with_model_defaults(self, model) -> SamplingParams:
        """These params with the stop and pad ids filled from the model's generation config (the LLM's, e.g. an
        instruct model's end-of-turn ids), then from its language model's config; and its <image> placeholder
        suppressed (a placeholder is never an answer)."""
        sources = [model.generation_config, model.config.text_config]
        stop = self.stop_token_ids
        if stop is None:
            stop = _as_tuple(next((c.eos_token_id for c in sources if c.eos_token_id is not None), ()))
        pad = self.pad_token_id
        if pad is None:
            pad = next((c.pad_token_id for c in sources if c.pad_token_id is not None), stop[0] if stop else 0)
        suppress = tuple(dict.fromkeys((*self.suppress_token_ids, model.config.image_token_id)))
        return replace(self, stop_token_ids=stop, pad_token_id=pad, suppress_token_ids=suppress)

    def generator(self, device) -> torch.Generator | None:
        """A generator seeded with `seed` (None without a seed: torch's global one)."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from next-token logits (B, V): greedy, or sampled after temperature, top-k and top-p (in
    that order). Suppressed ids are never returned. `logits` is left unchanged."""
    if params.suppress_token_ids:
        banned = torch.tensor(params.suppress_token_ids, device=logits.device)
        logits = logits.index_fill(-1, banned, float("-inf"))
    if not params.do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float()
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k:
        scores = _keep_top_k(scores, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        scores = _keep_top_p(scores, params.top_p)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)


def _keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (B, V) with every token below the k-th largest set to -inf (ties with it stay)."""
    kth = scores.topk(min(k, scores.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def _keep_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """scores (B, V) keeping the most likely tokens until their probability reaches top_p (at least one)."""
    ascending, order = scores.sort(dim=-1)  # (B, V) each
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p  # the unlikely tail whose mass stays below 1 - p
    drop[:, -1] = False
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def finish(tokens: torch.Tensor, finished: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's stop handling, with params from `with_model_defaults`: rows that ended before get
    `pad_token_id` instead of their token; a row ends with its first stop token. Returns (tokens, finished), (B,)
    each."""
    tokens = torch.where(finished, params.pad_token_id, tokens)
    stop = torch.tensor(params.stop_token_ids, dtype=torch.long, device=tokens.device)
    return tokens, finished | torch.isin(tokens, stop)


@dataclass
class GenerationStep:
    tokens: torch.Tensor  # (B,) this step's token of every row; pad_token_id in rows that ended before
    finished: torch.Tensor  # (B,) bool: the row has produced a stop token (at this step or before)


@torch.no_grad()
def generate_steps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    params: SamplingParams | None = None,
    generator: torch.Generator | None = None,
    **images,
) -> Iterator[GenerationStep]:
    """Prefill a left-padded batch with its images (the keywords of `model.prefill`), then yield every row's next
    token, step by step, until `params.max_new_tokens` steps or until every row has ended. Rows that ended keep
    their place in the batch; their steps carry `pad_token_id`."""
    params = (params or SamplingParams()).with_model_defaults(model)
    cache = model.new_cache(reserve=params.max_new_tokens)
    logits = model.prefill(input_ids, attention_mask, cache=cache, **images).logits[:, -1]  # (B, V)
    if generator is None:
        generator = params.generator(logits.device)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=logits.device)
    for step in range(params.max_new_tokens):
        tokens, finished = finish(sample(logits, params, generator), finished, params)
        yield GenerationStep(tokens, finished)
        if bool(finished.all()) or step == params.max_new_tokens - 1:
            return  # no decode step whose logits nobody reads
        logits = model.decode_step(tokens, cache)


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_context=None,
    *,
    image_crops: torch.Tensor | None = None,
    vision_features: dict | None = None,
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
    filled with `pad_token_id` afterwards. Defaults for eos/pad come from the model (`SamplingParams.
    with_model_defaults`). `streamer` follows transformers' streamer protocol: `put` the prompt, then every step's
    tokens, then `end`.
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                            top_k=top_k, top_p=top_p, stop_token_ids=eos_token_id, pad_token_id=pad_token_id)
    steps = generate_steps(model, input_ids, attention_mask, params=params, generator=generator,
                           pixel_values=pixel_values, image_crops=image_crops, image_context=image_context,
                           vision_features=vision_features)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    new_tokens = []
    for step in steps:
        new_tokens.append(step.tokens)
        if streamer is not None:
            streamer.put(step.tokens.cpu())
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
