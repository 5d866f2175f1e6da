"""The continuous-batching engine: many requests share one running batch, one decode step at a time.

Every `step()`:
1. requests cancelled since the last step leave the running batch (their cache rows are freed);
2. one decode step feeds the running rows the tokens they sampled last step, which gives their next logits;
3. waiting requests are admitted while the running batch has rows free and the prefill token budget allows (always
   at least one): their images come from the image-context cache or are encoded together, they are prefilled
   together into a cache of their own, which is merged into the running one;
4. every running row samples its next token with its own parameters (and its own seeded generator), and the step
   returns at once, so a new request's first token reaches its client right after its prefill;
5. rows that finished (a stop token, a stop string, their token budget) leave.

A request's greedy tokens are the tokens `model.generate` gives it alone: the cache keeps every row's attention
exactly as it would be alone (`KVCache.merge`/`select`). Requests come in through a thread-safe inbox, so another
thread (the server's event loop) may `submit` and `cancel` while one thread runs `step`. No HTTP here.
"""

from __future__ import annotations

import copy
import itertools
import queue
import time
from dataclasses import dataclass, field, replace

import torch

from leanvlm.config import IMAGE_TOKEN
from leanvlm.data.templates import generation_prompt
from leanvlm.decoders import DECODERS
from leanvlm.decoders.base import ImageContext, left_pad
from leanvlm.eval.exact_match import prompt_ids
from leanvlm.generation import SamplingParams, sample
from leanvlm.inference.image_cache import ImageCache, content_key
from leanvlm.inference.metrics import EngineMetrics

MAX_ASPECT = 20  # a 1 x 20,000,000 image would be resized to billions of pixels by a shortest-edge processor
GREEDY_BELOW = 1e-5  # temperatures this small sample the argmax anyway (and 1e-300 would overflow the softmax)
SEEDS = range(-(2**63), 2**64)  # what torch.Generator.manual_seed takes
RESERVE = 64  # KV slots allocated with a prefill for the tokens to come


@dataclass(frozen=True)
class ImageInput:
    """One image of a request: the decoded picture and the key it is cached under (`content_key` of its bytes)."""

    image: object  # a PIL image
    key: str

    @classmethod
    def from_bytes(cls, data: bytes) -> ImageInput:
        """Decode image file bytes (PNG, JPEG, ...); a ValueError says when they are not an image."""
        import io

        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(io.BytesIO(data))
            image.load()
            image = image.convert("RGB")
        except UnidentifiedImageError as error:
            raise ValueError("The image could not be decoded: its bytes are no image format Pillow reads; send a "
                             "PNG, JPEG, GIF, BMP or WebP file.") from error
        except Exception as error:  # Pillow raises SyntaxError, struct.error, EOFError... for broken files
            raise ValueError(f"The image could not be decoded ({type(error).__name__}: {error}).") from error
        width, height = image.size
        if max(width, height) > MAX_ASPECT * min(width, height):
            raise ValueError(f"The image is {width}x{height} pixels; images more than {MAX_ASPECT} times longer "
                             "than wide (or wide than long) are refused.")
        return cls(image, content_key(data))


@dataclass
class Request:
    """A prompt (token ids with one `<image>` placeholder per image), its images and how to sample its answer."""

    id: str
    prompt_ids: list[int]
    images: list[ImageInput]
    params: SamplingParams  # with the model's defaults filled in (`Engine.request` does it)
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings, which it does not include
    length: int = 0  # decoder positions of the prompt (`Engine.prompt_length`)
    arrival: float = field(default_factory=time.perf_counter)
    # filled while it runs
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # the answer so far
    sent: int = 0  # characters of `text` already reported
    finish_reason: str | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    generator: torch.Generator | None = None


@dataclass
class Output:
    """What one step produced for one request: new text (held back while it might begin a stop string) and tokens,
    and, on its last output, why it finished."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class Engine:
    """Continuous batching over one model; see the module docstring. `max_batch_size` bounds the running rows,
    `max_prefill_tokens` the decoder tokens prefilled in one step, `image_cache_bytes` the image-context cache;
    `default_max_tokens` is the answer length of a request that sets none (within what the context leaves)."""

    def __init__(self, model, processor, *, max_batch_size: int = 16, max_prefill_tokens: int = 4096,
                 image_cache_bytes: int = 1 << 30, model_id: str = "model", default_max_tokens: int = 256):
        if max_batch_size < 1 or max_prefill_tokens < 1:
            raise ValueError(f"max_batch_size and max_prefill_tokens must be >= 1, got {max_batch_size} and "
                             f"{max_prefill_tokens}.")
        self.model, self.processor = model.eval(), processor
        # the loop's own copy: a fast tokenizer used from two threads at once can fail ("Already borrowed")
        self._detokenizer = copy.deepcopy(processor.tokenizer)
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.default_max_tokens = default_max_tokens
        self.image_cache = ImageCache(image_cache_bytes, model_id)
        self.metrics = EngineMetrics()
        self.device = model.get_input_embeddings().weight.device
        self.vision_takes_positions = DECODERS[model.config.decoder].vision_takes_positions
        self.crop_tokens = self._tokens_per_crop() if self.vision_takes_positions else 0
        self.context_length = model.config.text_config.max_position_embeddings
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._cancels: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._ids = itertools.count()
        self.waiting: list[Request] = []
        self.admitting: list[Request] = []  # taken from `waiting`, not yet in `running`
        self.running: list[Request] = []  # in cache row order
        self.cache = model.new_cache()
        self.logits: torch.Tensor | None = None  # (rows, V): the running rows' latest next-token logits
        self.next_tokens: torch.Tensor | None = None  # (rows,): sampled, not yet fed to the model

    # ------------------------------------------------------------------ requests
    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of the prompt a chat (messages {"role", "content"} with `<image>` placeholders, ending with
        the user's turn) gives with the model's template. Call it from one thread (the server's event loop)."""
        pieces = generation_prompt(messages, self.processor.template, self.processor.tokenizer)
        return prompt_ids(self.processor, pieces)

    def request(self, prompt_ids: list[int], images: list[ImageInput] = (), *, max_new_tokens: int | None = None,
                do_sample: bool = False, temperature: float = 1.0, top_p: float | None = None,
                top_k: int | None = None, seed: int | None = None, stop: tuple[str, ...] = (),
                stop_token_ids: tuple[int, ...] = (), ignore_eos: bool = False,
                request_id: str | None = None) -> Request:
        """A checked request: a ValueError says what is wrong (placeholders that do not match the images, a prompt
        that does not fit the context, bad sampling parameters). Without `max_new_tokens`, the engine's
        `default_max_tokens` within what the context leaves. `stop_token_ids` end the answer besides the model's
        own end-of-turn ids, or instead of them with `ignore_eos`."""
        images = list(images)
        placeholders = sum(1 for t in prompt_ids if t == self.model.config.image_token_id)
        if placeholders != len(images):
            raise ValueError(f"The prompt has {placeholders} {IMAGE_TOKEN} placeholder(s) but {len(images)} "
                             "image(s) were given.")
        if seed is not None and seed not in SEEDS:
            raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}.")
        if do_sample and temperature < GREEDY_BELOW:
            do_sample, temperature = False, 1.0
        length = self.prompt_length(prompt_ids, images)
        if max_new_tokens is None:
            max_new_tokens = max(1, min(self.default_max_tokens, self.context_length - length))
        if length + max_new_tokens > self.context_length:
            raise ValueError(f"The prompt takes {length} positions and max_tokens={max_new_tokens} more, beyond the "
                             f"model's context of {self.context_length}; shorten the prompt or lower max_tokens.")
        params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed).with_model_defaults(self.model)
        own = () if ignore_eos else params.stop_token_ids
        params = replace(params, stop_token_ids=(*own, *map(int, stop_token_ids)))
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError("Every stop string must be a non-empty string.")
        return Request(request_id or f"req-{next(self._ids)}", list(prompt_ids), images, params, tuple(stop),
                       length)

    def prompt_length(self, prompt_ids: list[int], images: list[ImageInput]) -> int:
        """Decoder positions a prompt takes: its text, plus, for policies whose vision tokens take positions, every
        crop's tokens (and its newline, when the model has one) in place of each placeholder."""
        if not self.vision_takes_positions:
            return len(prompt_ids) - len(images)
        per_crop = self.crop_tokens + int(self.model.config.uses_image_newline)
        crops = sum(len(self.processor.crops_of(image.image)) for image in images)
        return len(prompt_ids) - len(images) + crops * per_crop

    def _tokens_per_crop(self) -> int:
        """Vision tokens of one crop: what the encoder and the feature-select rule give, from one blank crop."""
        from PIL import Image

        size = self.processor.crop_size
        pixels = self.processor.image_processor(Image.new("RGB", (size, size)), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return int(self.model.encode_images(pixels.to(self.device)).tokens.shape[-2])

    def submit(self, request: Request) -> None:
        """Queue a request (thread-safe); its outputs come from the steps that follow."""
        self._inbox.put(request)

    def cancel(self, request_id: str) -> None:
        """Stop a request (thread-safe): it leaves at the next step, with finish reason "cancelled"."""
        self._cancels.put(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or not self._inbox.empty() or not self._cancels.empty())

    def num_waiting(self) -> int:
        return len(self.waiting) + self._inbox.qsize()

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def step(self) -> list[Output]:
        """One iteration (see the module docstring); returns the outputs of every request that produced something
        or finished."""
        started = time.perf_counter()
        model_seconds = 0.0
        cancelled = set()  # read before the inbox: a cancel that is visible has its request visible too
        while not self._cancels.empty():
            cancelled.add(self._cancels.get())
        while not self._inbox.empty():
            self.waiting.append(self._inbox.get())
        outputs = self._apply_cancels(cancelled)
        if self.running:
            tic = time.perf_counter()
            self.logits = self.model.decode_step(self.next_tokens.to(self.device), self.cache)
            model_seconds += time.perf_counter() - tic
        self.admitting = self._admit()
        if self.admitting:
            tic = time.perf_counter()
            self._prefill(self.admitting)
            model_seconds += time.perf_counter() - tic
        self.admitting = []
        if self.running:
            tokens = self._sample()
            now = time.perf_counter()
            keep = []
            for request, token in zip(self.running, tokens.tolist(), strict=True):
                outputs.append(self._advance(request, token, now))
                keep.append(request.finish_reason is None)
            self.next_tokens = tokens
            self._leave(keep)
        self.metrics.step(time.perf_counter() - started, model_seconds, len(self.running), len(self.waiting))
        return outputs

    def run_until_done(self) -> dict[str, list[Output]]:
        """Step until every submitted request has finished; return each request's outputs (for scripts and tests)."""
        collected: dict[str, list[Output]] = {}
        while self.has_work():
            for output in self.step():
                collected.setdefault(output.request_id, []).append(output)
        return collected

    def _apply_cancels(self, cancelled: set[str]) -> list[Output]:
        if not cancelled:
            return []
        outputs = []
        for request in [r for r in self.waiting if r.id in cancelled]:
            self.waiting.remove(request)
            outputs.append(self._finish(request, "cancelled"))
        keep = [request.id not in cancelled for request in self.running]
        for request, kept in zip(self.running, keep, strict=True):
            if not kept:
                outputs.append(self._finish(request, "cancelled"))
        self._leave(keep)
        return outputs

    def _admit(self) -> list[Request]:
        """Waiting requests (first come, first served) that fit the free rows and the prefill token budget."""
        admitted, budget = [], self.max_prefill_tokens
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            cost = self.waiting[0].length
            if admitted and cost > budget:
                break
            admitted.append(self.waiting.pop(0))
            budget -= cost
        return admitted

    def _prefill(self, admitted: list[Request]) -> None:
        rows = [torch.tensor(r.prompt_ids, dtype=torch.long) for r in admitted]
        input_ids, valid = left_pad(rows, self.processor.tokenizer.pad_token_id)
        images = [image for r in admitted for image in r.images]
        context = self._image_context(images) if images else None
        # a modest reserve: merge and select copy the room too, and the cache grows geometrically past it
        cache = self.model.new_cache(reserve=min(RESERVE, max(r.params.max_new_tokens for r in admitted)))
        logits = self.model.prefill(input_ids.to(self.device), valid.to(self.device), image_context=context,
                                    cache=cache).logits[:, -1]
        self.cache.merge(cache)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        for request in admitted:
            if request.params.do_sample:
                request.generator = request.params.generator(self.device)
            self.metrics.admitted(time.perf_counter() - request.arrival)
        self.running += admitted

    def _image_context(self, images: list[ImageInput]) -> ImageContext:
        """The images' contexts, in order: from the cache, the others encoded together (and then cached)."""
        found = {key: self.image_cache.get(key) for key in dict.fromkeys(image.key for image in images)}
        self.image_cache.hits += len(images) - len(found)  # a repeat within the batch is encoded once too
        missing = [image for image in {i.key: i for i in images}.values() if found[image.key] is None]
        if missing:
            pixel_values, crops = self.processor.preprocess_images([image.image for image in missing])
            encoded = self.model.encode_images(pixel_values.to(self.device), crops)
            for index, image in enumerate(missing):
                found[image.key] = encoded[index]  # a copy of the image's rows: it does not pin the batch
                self.image_cache.put(image.key, found[image.key])
        return ImageContext.cat([found[image.key] for image in images])

    def _sample(self) -> torch.Tensor:
        """Every running row's next token (rows,), each with its own parameters; rows that sample greedily with the
        same parameters are picked together."""
        tokens = torch.empty(len(self.running), dtype=torch.long, device=self.logits.device)
        greedy: dict[tuple[int, ...], list[int]] = {}  # suppressed ids -> rows: all greedy needs to know
        for row, request in enumerate(self.running):
            if request.params.do_sample:
                tokens[row] = sample(self.logits[row : row + 1], request.params, request.generator)[0]
            else:
                greedy.setdefault(request.params.suppress_token_ids, []).append(row)
        for suppressed, rows in greedy.items():
            index = torch.tensor(rows, device=tokens.device)
            tokens[index] = sample(self.logits[index], SamplingParams(suppress_token_ids=suppressed))
        return tokens.cpu()

    def _advance(self, request: Request, token: int, now: float) -> Output:
        """Add one sampled token to a request; decide whether it finished; report what is new."""
        if request.first_token_at is None:
            request.first_token_at = now
            self.metrics.first_token(now - request.arrival)
        else:
            self.metrics.next_token(now - request.last_token_at)
        request.last_token_at = now
        request.output_ids.append(token)
        if token in request.params.stop_token_ids:
            return self._finish(request, "stop", [token])
        text = self._detokenizer.decode(request.output_ids, skip_special_tokens=True)
        cut = _first_stop(text, request.stop, request.sent)
        if cut is not None:
            request.text = text[:cut]
            return self._finish(request, "stop", [token])
        request.text = text
        if len(request.output_ids) >= request.params.max_new_tokens:
            return self._finish(request, "length", [token])
        # hold back what may still turn into a stop string, or an unfinished multi-byte character
        held = max((len(s) - 1 for s in request.stop), default=0)
        ready = len(text) - held
        while ready > request.sent and text[ready - 1] == "\ufffd":
            ready -= 1
        new_text = text[request.sent : ready] if ready > request.sent else ""
        request.sent = max(request.sent, ready)
        return Output(request.id, new_text, [token], None, len(request.prompt_ids), len(request.output_ids))

    def _finish(self, request: Request, reason: str, tokens: list[int] = ()) -> Output:
        request.finish_reason = reason
        rest = request.text[request.sent :]
        request.sent = len(request.text)
        self.metrics.finished(reason, len(request.prompt_ids), len(request.output_ids))
        return Output(request.id, rest, list(tokens), reason, len(request.prompt_ids), len(request.output_ids))

    def _leave(self, keep: list[bool]) -> None:
        """Drop the running rows whose `keep` is False (their cache rows and pending logits)."""
        if all(keep):
            return
        self.cache.select(keep)  # first: if it fails, `running` still lists every row for `fail_all`
        self.running = [r for r, kept in zip(self.running, keep, strict=True) if kept]
        kept = torch.tensor(keep)
        self.logits = self.logits[kept.to(self.logits.device)] if self.running else None
        self.next_tokens = self.next_tokens[kept] if self.running and self.next_tokens is not None else None

    def fail_all(self, reason: str = "error") -> list[Output]:
        """End every request the engine holds (after a step raised) and start from an empty batch. A request the
        failed step had already finished gets this last output too: the step's own outputs were lost."""
        while not self._inbox.empty():
            self.waiting.append(self._inbox.get())
        outputs = [self._finish(r, reason) for r in self.waiting + self.admitting + self.running]
        self.waiting, self.admitting, self.running = [], [], []
        self.cache, self.logits, self.next_tokens = self.model.new_cache(), None, None
        return outputs


def _first_stop(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    """Where the first stop string starts in `text` (searching only where a new one can be), or None."""
    if not stops:
        return None
    start = max(0, sent - max(len(s) for s in stops))
    hits = [index for index in (text.find(s, start) for s in stops) if index >= 0]
    return min(hits) if hits else None
