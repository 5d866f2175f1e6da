"""A saved leanvlm model as an lmms-eval model: `python -m lmms_eval --model leanvlm --model_args pretrained=DIR`.

lmms-eval finds it through the `lmms_eval.models` entry point that leanvlm's package metadata declares (`manifest`
below): a chat model (`is_simple = False`, the default route) and a simple one (`--force_simple`, the route of
log-likelihood tasks such as multiple choice, which lmms-eval builds for simple models only). Both ask with the
template the model was trained with and place each message's images before its text, as `leanvlm eval` and
`leanvlm serve` do, so the same records give the same answers in all three.

This module imports lmms-eval; nothing else in leanvlm does.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.protocol import ChatMessages
from lmms_eval.utils import simple_parse_args_string
from PIL import Image, UnidentifiedImageError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from leanvlm.config import IMAGE_TOKEN
from leanvlm.data.templates import generation_prompt, segments, with_image_placeholders
from leanvlm.decoders.base import left_pad
from leanvlm.eval.exact_match import answer, image_inputs, load_model, prompt_ids

MODEL_ID = "leanvlm"
DEFAULT_MAX_NEW_TOKENS = 128


def manifest() -> ModelManifest:
    """What the `lmms_eval.models` entry point hands lmms-eval: both routes under one name."""
    return ModelManifest(model_id=MODEL_ID, chat_class_path=f"{__name__}.LeanVLM",
                         simple_class_path=f"{__name__}.LeanVLMSimple")


def rgb(image) -> Image.Image:
    """An lmms-eval visual (a PIL image or a path) as the RGB image leanvlm's processor takes."""
    if isinstance(image, str):
        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"leanvlm models read images; {image!r} is not one it can open ({exc}).") from exc
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise ValueError(f"leanvlm models read images (PIL or a path), not {type(image).__name__}.")


def chat_conversation(raw_messages) -> tuple[list[dict], list[Image.Image]]:
    """lmms-eval chat messages -> leanvlm messages (`<image>` placeholders before each message's text) and the
    images in placeholder order. Video and audio are refused: leanvlm models take images and text."""
    messages, images = [], []
    for message in ChatMessages(messages=raw_messages).messages:
        texts, pictures = [], []
        for part in message.content:
            if part.type == "text":
                if IMAGE_TOKEN in part.text:
                    raise ValueError(f"A text part contains {IMAGE_TOKEN}: remove it from the task's messages and "
                                     "send the image as an image part; leanvlm places images before the text.")
                texts.append(part.text)
            elif part.type == "image":
                pictures.append(rgb(part.url))
            else:
                raise ValueError(f"leanvlm models take images and text, not {part.type}.")
        images += pictures
        messages.append({"role": message.role, "content": with_image_placeholders(texts, len(pictures))})
    return messages, images


def until_first_stop(text: str, until) -> str:
    """The answer up to the first of the task's stop strings (lmms-eval's `until`)."""
    stops = [until] if isinstance(until, str) else list(until or ())
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()


def sampling_options(gen_kwargs: dict) -> dict:
    """lmms-eval generation kwargs -> `generate`'s: greedy at temperature 0 (lmms-eval's usual setting) unless the
    task asks for sampling; beam search is refused rather than silently replaced."""
    if int(gen_kwargs.get("num_beams") or 1) > 1:
        raise ValueError("leanvlm generates greedily or by sampling; num_beams > 1 is not supported.")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    options = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)}
    if temperature > 0 and gen_kwargs.get("do_sample", True):
        options.update(do_sample=True, temperature=temperature, top_p=gen_kwargs.get("top_p"),
                       top_k=gen_kwargs.get("top_k"))
    return options


class LeanVLM(lmms):
    """`pretrained`: a directory `save_pretrained` wrote (model + processor). `batch_size`: questions generated
    together. `dtype`: run the weights in this dtype (default: as saved). `device`: default the GPU when there is
    one. One process: lmms-eval's multi-process launch is refused."""

    is_simple = False

    def __init__(self, pretrained: str, batch_size: int | str = 8, dtype: str | None = None,
                 device: str | None = None, max_batch_size: int | None = None, **unknown):
        # max_batch_size: lmms-eval's CLI passes it when set; leanvlm batches by batch_size alone
        super().__init__()
        if unknown:
            raise ValueError(f"Unknown model_args for leanvlm: {', '.join(sorted(unknown))}; it takes pretrained, "
                             "batch_size, dtype and device.")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("The leanvlm lmms-eval model runs in one process; launch lmms-eval without "
                             "accelerate/torchrun (pass device=cuda:N to pick a GPU).")
        if str(batch_size).startswith("auto"):
            raise ValueError("leanvlm needs a fixed batch_size (e.g. batch_size=8), not 'auto'.")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if dtype is not None and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"Unknown dtype {dtype!r}; use e.g. bfloat16 or float32.")
        self.model, self.processor = load_model(pretrained)
        if dtype is not None:
            self.model.to(getattr(torch, dtype))
        if device is not None:
            self.model.to(device)
        self.pretrained = pretrained

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """`--model_args` first, then the CLI's own options (`--batch_size`, `--device`) for what they leave out:
        lmms-eval always passes its `--batch_size` (default 1), which would otherwise clash with
        `--model_args batch_size=8`."""
        args = simple_parse_args_string(arg_string)
        rest = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **rest)

    # --- what lmms-eval asks -------------------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        """One answer per request, generated in batches of requests that share their generation kwargs; a batch's
        images are read when it runs."""
        index = self._gen_kwargs_index
        return self._answer_all([(lambda r=request: self._conversation(r), request.args[index])
                                 for request in requests])

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        """lmms-eval's multi-round protocol: round 0 asks `doc_to_messages(doc)`; each later round asks what
        `doc_to_messages(doc, round_idx=..., previous_output=..., previous_round_info=...)` returns, until it says
        the sample is done. Each round is answered as its own chat, all open samples of a round in batches."""
        if self.is_simple:
            raise ValueError("Multi-round tasks run on the chat route; drop --force_simple.")
        outputs: list[list[str]] = [[] for _ in requests]
        info = [None] * len(requests)
        open_samples = list(range(len(requests)))
        round_idx = 0
        while open_samples:
            asked, still_open = [], []
            for i in open_samples:
                _, doc_to_messages, gen_kwargs, doc_id, task, split = requests[i].args
                doc = self.task_dict[task][split][doc_id]
                if round_idx == 0:
                    raw = doc_to_messages(doc)
                else:
                    payload = doc_to_messages(doc, round_idx=round_idx, previous_output=list(outputs[i]),
                                              previous_round_info=info[i])
                    if not (isinstance(payload, tuple) and len(payload) == 4) or payload[1]:
                        continue
                    raw, _, _, info[i] = payload
                asked.append((lambda raw=raw: chat_conversation(raw), gen_kwargs))
                still_open.append(i)
            for i, text in zip(still_open, self._answer_all(asked, f"round {round_idx}"), strict=True):
                outputs[i].append(text)
            open_samples = still_open
            round_idx += 1
        return outputs

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding would produce exactly the continuation) per
        request, from the model's forward on the context asked with its template and the continuation placed as
        the model's answer (as training placed answers: vicuna_v1's space before it included)."""
        if not self.is_simple:
            raise ValueError("lmms-eval builds log-likelihood requests for simple models only; run with "
                             "--force_simple.")
        results = []
        for start in range(0, len(requests), self.batch_size):
            rows = [self._scored_row(request) for request in requests[start : start + self.batch_size]]
            results += self._continuation_scores(rows)
        return results

    # --- helpers ------------------------------------------------------------------------------------------------

    @property
    def _gen_kwargs_index(self) -> int:
        return 1 if self.is_simple else 2

    def _conversation(self, request) -> tuple[list[dict], list[Image.Image]]:
        """A request as leanvlm messages and images. Chat route: the task's messages. Simple route: the task's text
        as one user turn, its images before it (or at the text's own `<image>` placeholders when it has one per
        image)."""
        if not self.is_simple:
            _, doc_to_messages, _, doc_id, task, split = request.args
            return chat_conversation(doc_to_messages(self.task_dict[task][split][doc_id]))
        context, _, doc_to_visual, doc_id, task, split = request.args
        images = [rgb(v) for v in (doc_to_visual(self.task_dict[task][split][doc_id]) or [])]
        placeholders = context.count(IMAGE_TOKEN)
        if placeholders not in (0, len(images)):
            raise ValueError(f"Request {doc_id} of {task}: the text has {placeholders} {IMAGE_TOKEN} "
                             f"placeholder(s) for {len(images)} image(s); write one per image or none.")
        content = context if placeholders else with_image_placeholders([context], len(images))
        return [{"role": "user", "content": content}], images

    def _scored_row(self, request) -> tuple[list[int], int, list[Image.Image]]:
        """(prompt + continuation ids, continuation length, images) of one log-likelihood request."""
        _, continuation, _, doc_id, task, split = request.args
        if callable(continuation):  # loglikelihood tasks pass their doc_to_target
            continuation = continuation(self.task_dict[task][split][doc_id])
        if not isinstance(continuation, str):
            raise ValueError(f"Request {doc_id} of {task}: expected a text continuation, got {continuation!r}.")
        messages, images = self._conversation(request)
        target = self._answer_ids(messages, continuation)
        if not target:
            raise ValueError(f"Request {doc_id} of {task}: the continuation {continuation!r} has no tokens; check "
                             "the task's doc_to_choice and target_delimiter.")
        return self._prompt(messages) + target, len(target), images

    def _answer_ids(self, messages: list[dict], continuation: str) -> list[int]:
        """The continuation's token ids as training tokenizes an answer: the template's answer piece up to the
        continuation's end (vicuna_v1 puts a space before it, which BPE merges into the first word)."""
        tokenizer = self.processor.tokenizer
        pieces = segments([*messages, {"role": "assistant", "content": continuation}], self.processor.template,
                          tokenizer)
        answer = pieces[-1][0] if pieces and pieces[-1][1] else continuation
        end = answer.find(continuation) + len(continuation) if continuation in answer else len(answer)
        return tokenizer(answer[:end], add_special_tokens=False)["input_ids"]

    def _prompt(self, messages: list[dict]) -> list[int]:
        return prompt_ids(self.processor, generation_prompt(messages, self.processor.template,
                                                            self.processor.tokenizer))

    def _answer_all(self, asked: list[tuple], label: str = "") -> list[str]:
        """Answers to (conversation, gen_kwargs) pairs, in their order, where `conversation()` gives (messages,
        images) and is called when its batch runs. Batches group equal kwargs."""
        groups = defaultdict(list)
        for index, (_, gen_kwargs) in enumerate(asked):
            groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append(index)
        answers: list[str | None] = [None] * len(asked)
        columns = (TextColumn(f"leanvlm answering {label}".rstrip()), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, disable=self.rank != 0) as bar:
            task = bar.add_task("answer", total=len(asked))
            for indices in groups.values():
                gen_kwargs = asked[indices[0]][1]
                options = sampling_options(gen_kwargs)
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start : start + self.batch_size]
                    conversations = [asked[i][0]() for i in batch]
                    prompts = [generation_prompt(messages, self.processor.template, self.processor.tokenizer)
                               for messages, _ in conversations]
                    images = [image for _, row_images in conversations for image in row_images]
                    for i, text in zip(batch, answer(self.model, self.processor, prompts, images, **options),
                                       strict=True):
                        answers[i] = until_first_stop(text, gen_kwargs.get("until"))
                    bar.advance(task, len(batch))
        return answers

    def _continuation_scores(self, rows: list[tuple]) -> list[tuple[float, bool]]:
        """Rows of (prompt + continuation ids, continuation length, images): the continuation's summed log
        probability and whether it is the greedy choice at every step, from one left-padded forward."""
        input_ids, valid = left_pad([torch.tensor(ids) for ids, _, _ in rows], self.processor.tokenizer.pad_token_id)
        longest = max(length for _, length, _ in rows)
        device = self.model.device
        images = image_inputs(self.processor, [image for _, _, row_images in rows for image in row_images], device)
        logits = self.model(input_ids.to(device), valid.long().to(device), logits_to_keep=longest + 1,
                            **images).logits.float()
        # left padding: every row ends at the last column, so its continuation is the last `length` tokens, each
        # predicted by the position before it
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1).cpu()
        scores = []
        for row, (ids, length, _) in enumerate(rows):
            target = torch.tensor(ids[-length:])
            predicted = log_probs[row, -length:]
            scores.append((float(predicted.gather(-1, target[:, None]).sum()),
                           bool(torch.equal(predicted.argmax(-1), target))))
        return scores


class LeanVLMSimple(LeanVLM):
    """The same model on lmms-eval's simple route (`--force_simple`): requests carry the task's text prompt and a
    function that gives the document's images. Log-likelihood (multiple-choice) tasks need this route."""

    is_simple = True
