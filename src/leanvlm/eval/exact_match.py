"""Evaluation on LLaVA-format questions: each record's last assistant turn is the reference, and the model answers
the conversation before it, greedily and in batches, with the template it was trained with. Exact match by default;
VQAv2 soft accuracy and ANLS over a record's `answers`, or multiple choice over its `options` (`leanvlm.eval.
metrics`)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from leanvlm.config import IMAGE_TOKEN
from leanvlm.data.llava import record_image_paths, stack_features
from leanvlm.data.templates import generation_prompt, to_messages, with_image_placeholders
from leanvlm.decoders.base import left_pad
from leanvlm.eval.metrics import BINARY_SCORES, METRICS, SCORES, multiple_choice_accuracy, option_letter
from leanvlm.processing import PROCESSOR_FILE
from leanvlm.reports import listed
from leanvlm.stats import Z95, accuracy_text, wilson_interval

TRAILING_PUNCTUATION = ".,;:!?"


def normalize(text: str) -> str:
    """Case, spacing and a final full stop are style, not content: "Red." and " red" are the same answer."""
    return " ".join(text.lower().split()).rstrip(TRAILING_PUNCTUATION).rstrip()


@dataclass
class Question:
    """One record made ready to ask: `prompt` is the template's pieces (see `generation_prompt`), `images` the
    image paths in placeholder order."""

    id: object
    family: str | None
    question: str
    reference: str
    prompt: list[str]
    images: list[str]
    references: list[str]  # every accepted answer (a record's `answers`, else the reference alone)
    options: list[str] | None = None  # a multiple-choice record's `options`, lettered A, B, ...


@dataclass
class Conversation:
    """One record ready to ask, before any template: `messages` are the turns before the last answer (`<image>`
    placeholders in place), `images` the image paths in placeholder order."""

    id: object
    family: str | None
    messages: list[dict]
    reference: str
    images: list[str]
    references: list[str]
    options: list[str] | None = None


def conversations(records: list, image_root: str = ".", source: str = "data") -> list[Conversation]:
    """Records -> conversations to ask. A record that cannot be asked (no assistant turn, bad roles, images that do
    not match the placeholders or do not exist) is an error naming it, before any generation starts."""
    asked = []
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise ValueError(f"{source}, record {index}: a record needs a 'conversations' list.")
        where = f"{source}, record {index} (id {record.get('id')!r})"
        messages = to_messages(record["conversations"], where)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError(f"{where}: no assistant ('gpt') turn; the last one is the reference answer, so every "
                             "record needs one.")
        prompt, reference = messages[:last], messages[last]["content"]
        paths = record_image_paths(record, image_root)
        placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in prompt)
        users = [i for i, m in enumerate(prompt) if m["role"] == "user"]
        if paths and placeholders == 0 and users:  # as in training: images without a placeholder go first
            first = users[0]
            prompt[first] = {**prompt[first], "content": with_image_placeholders([prompt[first]["content"]],
                                                                                  len(paths))}
        elif placeholders != len(paths):
            raise ValueError(f"{where}: {placeholders} {IMAGE_TOKEN} placeholder(s) before the last answer but "
                             f"{len(paths)} image(s).")
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{where}: image {path!r} not found (relative paths start from the image "
                                        f"root {image_root!r}).")
        answers, options = record.get("answers"), record.get("options")
        asked.append(Conversation(record.get("id"), record.get("family"), prompt, reference, paths,
                                  answers if _strings(answers) else [reference],
                                  options if _strings(options) else None))
    return asked


def _strings(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def check_metric_fields(records: list, metric: str, source: str = "data") -> None:
    """Before any generation: every record carries what `metric` reads (`answers` for vqa and anls, `options` and
    a reference that names one of them for multiple_choice), else an error naming the record."""
    if metric not in SCORES:
        raise ValueError(f"Unknown metric {metric!r}; choose one of {', '.join(SCORES)}.")
    field = {"vqa": "answers", "anls": "answers", "multiple_choice": "options"}.get(metric)
    for index, record in enumerate(records):
        where = f"{source}, record {index} (id {record.get('id')!r})"
        value = record.get(field) if field else None
        if field == "answers" and value is not None and not _strings(value):
            raise ValueError(f"{where}: 'answers' must be a non-empty list of strings (the reference answers).")
        if field == "options":
            if not _strings(value):
                raise ValueError(f"{where}: multiple_choice needs 'options', a non-empty list of strings.")
            reference = [m for m in to_messages(record["conversations"], where) if m["role"] == "assistant"][-1]
            reference = reference["content"]
            if option_letter(reference, value) is None:
                raise ValueError(f"{where}: the reference {reference!r} names none (or several) of the options "
                                 f"{value!r}; write a letter or one option's text.")


def questions(records: list, template: str, tokenizer, image_root: str = ".", source: str = "data") -> list[Question]:
    """Records -> questions in the model's `template` (see `conversations` for what makes a record an error)."""
    asked = []
    for c in conversations(records, image_root, source):
        users = [m for m in c.messages if m["role"] == "user"]
        question = users[-1]["content"].replace(IMAGE_TOKEN, "").strip() if users else ""
        asked.append(Question(c.id, c.family, question, c.reference,
                              generation_prompt(c.messages, template, tokenizer), c.images, c.references, c.options))
    return asked


def encode_prompts(processor, prompts: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt pieces -> left-padded `input_ids` and `attention_mask`. Each piece is tokenized on its own, without
    special tokens, exactly as `LLaVADataset.tokenize` builds training samples."""
    rows = [torch.tensor(prompt_ids(processor, pieces), dtype=torch.long) for pieces in prompts]
    input_ids, valid = left_pad(rows, processor.tokenizer.pad_token_id)
    return input_ids, valid.long()


def prompt_ids(processor, pieces: list[str]) -> list[int]:
    """One prompt's pieces -> the model's token ids (its own `<image>` id at the placeholders)."""
    ids = [t for piece in pieces for t in processor.tokenizer(piece, add_special_tokens=False)["input_ids"]]
    return [processor.image_token_id if t == processor.tokenizer_image_id else t for t in ids]


def image_inputs(processor, images: list | None, device) -> dict:
    """The model's image arguments for PIL images in placeholder order: `pixel_values` (on `device`) and
    `image_crops`; none without images."""
    if not images:
        return {}
    pixel_values, crops = processor.preprocess_images(images)
    return {"pixel_values": pixel_values.to(device), "image_crops": crops}


@torch.no_grad()
def answer(model, processor, prompts: list[list[str]], images: list | None = None, image_context=None,
           max_new_tokens: int = 16, streamer=None, **sampling) -> list[str]:
    """Answers to a batch of prompts, with their images (PIL, in placeholder order) or an `image_context` encoded
    before; greedy unless `sampling` (`generate`'s do_sample, temperature, top_p, ...) says otherwise. Only the new
    tokens are decoded; special tokens (end of turn, padding) are dropped."""
    input_ids, attention_mask = encode_prompts(processor, prompts)
    device = model.device
    extra = {"image_context": image_context, **image_inputs(processor, images, device)}
    output = model.generate(input_ids.to(device), attention_mask.to(device), max_new_tokens=max_new_tokens,
                            pad_token_id=processor.tokenizer.pad_token_id, streamer=streamer,
                            **{"do_sample": False, **sampling}, **extra)
    new_tokens = output[:, input_ids.shape[1]:].cpu()
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def question_score(metric: str, prediction: str, question: Question) -> float:
    """One answer's score in [0, 1] under `metric` (see `SCORES`)."""
    if metric == "exact_match":
        return float(normalize(prediction) == normalize(question.reference))
    if metric == "multiple_choice":
        if question.options is None:
            raise ValueError(f"Record {question.id!r} has no 'options'; multiple_choice needs them.")
        return multiple_choice_accuracy(prediction, question.options, question.reference)
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; choose one of {', '.join(SCORES)}.")
    return METRICS[metric](prediction, question.references)


def answer_prior(metric: str, group: list[Question]) -> float:
    """What always giving the group's most common reference answer scores, seeing neither the image nor the
    question (under exact match: the share of the most common reference)."""
    if not group:
        return 0.0
    common, _ = Counter(normalize(q.reference) for q in group).most_common(1)[0]
    answer = next(q.reference for q in group if normalize(q.reference) == common)  # as written, not re-normalised
    return sum(question_score(metric, answer, q) for q in group) / len(group)


def mean_interval(scores: list[float], z: float = Z95) -> tuple[float, float]:
    """The normal 95% interval of a mean of scores in [0, 1], clipped to [0, 1] (for partial-credit metrics, where
    Wilson's interval for counts does not apply)."""
    n = len(scores)
    if n < 2:
        return 0.0, 1.0
    mean = sum(scores) / n
    half = z * (sum((x - mean) ** 2 for x in scores) / (n - 1) / n) ** 0.5
    return max(0.0, mean - half), min(1.0, mean + half)


def tally(metric: str, scores: list[float], group: list[Question]) -> dict:
    """samples, correct (the summed score), accuracy (the mean score), its 95% interval (Wilson for 0/1 scores,
    normal otherwise) and the answer prior of one group of questions."""
    total = sum(scores)
    binary = metric in BINARY_SCORES
    # Wilson whenever every score is 0 or 1 (a normal interval collapses to a point when all scores agree)
    counted = binary or all(x in (0.0, 1.0) for x in scores)
    interval = wilson_interval(round(total), len(scores)) if counted else mean_interval(scores)
    return {"samples": len(scores), "correct": round(total) if binary else total,
            "accuracy": total / len(scores) if scores else 0.0, "ci95": list(interval),
            "answer_prior": answer_prior(metric, group)}


def score(asked: list[Question], predictions: list[str], metric: str = "exact_match") -> dict:
    """Each answer scored by `metric` (exact match after `normalize` by default), overall and per family (records
    without a family count only overall), each with its 95% interval and answer prior (the overall prior averages
    the families' priors by their size, or is the overall one when no record has a family)."""
    samples, scores, groups = [], [], {}
    for question, prediction in zip(asked, predictions, strict=True):
        scores.append(question_score(metric, prediction, question))
        samples.append({"id": question.id, "family": question.family, "question": question.question,
                        "reference": question.reference, "prediction": prediction, "correct": scores[-1] == 1.0,
                        "score": scores[-1]})
        if question.family is not None:
            groups.setdefault(question.family, []).append(len(samples) - 1)
    families = {name: tally(metric, [scores[i] for i in group], [asked[i] for i in group])
                for name, group in sorted(groups.items())}
    overall = tally(metric, scores, asked)
    if families and len(samples) == sum(f["samples"] for f in families.values()):
        overall["answer_prior"] = sum(f["answer_prior"] * f["samples"] for f in families.values()) / len(samples)
    return {**overall, "metric": metric, "families": families, "predictions": samples}


def cached_context(model, feature_cache, paths: list[str]):
    """The image context of `paths` from a `FeatureCache` of this model's encoder (the encoder does not run)."""
    features, crops = stack_features([feature_cache.image_features(p, model.config.feature_keys) for p in paths])
    return model.context_from_features(features, crops)


def evaluate(model, processor, records: list, image_root: str = ".", batch_size: int = 16,
             max_new_tokens: int = 16, progress: bool = True, source: str = "data", console=None,
             feature_cache=None, metric: str = "exact_match") -> dict:
    """Ask every record's last question with `processor.template` and score the answers by `metric` (see
    `score`). `source` names the records in error messages; `console` is where the progress bar draws; with a
    `feature_cache` holding these images' features (`leanvlm.data.features`), the encoder does not run."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    asked = questions(records, processor.template, processor.tokenizer, image_root, source)
    if not asked:
        raise ValueError(f"{source}: no records to evaluate.")
    check_metric_fields(records, metric, source)
    predictions = []
    columns = (TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("evaluate", total=-(-len(asked) // batch_size))
        for start in range(0, len(asked), batch_size):
            batch = asked[start : start + batch_size]
            paths = [path for question in batch for path in question.images]
            if feature_cache is not None and paths:
                context = cached_context(model, feature_cache, paths)
                predictions += answer(model, processor, [q.prompt for q in batch], image_context=context,
                                      max_new_tokens=max_new_tokens)
            else:
                images = [Image.open(path).convert("RGB") for path in paths]
                predictions += answer(model, processor, [q.prompt for q in batch], images,
                                      max_new_tokens=max_new_tokens)
            bar.advance(task)
    result = score(asked, predictions, metric)
    result["template"] = processor.template
    return result


METRIC_TITLES = {"exact_match": "Exact match", "vqa": "VQA accuracy", "anls": "ANLS",
                 "multiple_choice": "Multiple choice"}


def results_table(result: dict, title: str | None = None) -> Table:
    """One row per family, then the overall row: the metric's mean with its 95% interval, next to the answer
    prior."""
    metric = result.get("metric", "exact_match")
    binary = metric in BINARY_SCORES
    table = Table(title=title or METRIC_TITLES[metric])
    table.add_column("family")
    score_column = "accuracy" if binary else "mean score"
    for column in ("questions", "correct" if binary else "score sum", f"{score_column} [95% interval]",
                   "answer prior"):
        table.add_column(column, justify="right")
    for name, counts in [*result["families"].items(), ("overall", result)]:
        low, high = counts["ci95"]
        table.add_row(name, str(counts["samples"]),
                      str(counts["correct"]) if binary else f"{counts['correct']:.2f}",
                      accuracy_text(counts["correct"], counts["samples"]) if binary
                      else f"{counts['accuracy']:.1%} [{100 * low:.1f}, {100 * high:.1f}]",
                      f"{counts['answer_prior']:.1%}", style="bold" if name == "overall" else None)
    return table


def load_model(model_dir: str, variant: str | None = None):
    """A saved model (in eval mode, on the GPU when there is one) and its processor; a directory without them is
    an error that says which file is missing. `variant` (`NAME+key=value...`) runs the saved weights under another
    decoder policy with the same parameters, e.g. a trained vanilla model as `pool+keep_tokens=16`; one whose
    parameters differ is refused, naming them."""
    from leanvlm.config import parse_variant
    from leanvlm.modeling import LeanVLMForConditionalGeneration
    from leanvlm.processing import LeanVLMProcessor

    for name, written_by in (("config.json", "model.save_pretrained(dir)"),
                             (PROCESSOR_FILE, "LeanVLMProcessor.for_model(model, tokenizer).save_pretrained(dir)")):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise FileNotFoundError(f"{model_dir} has no {name}; pass a directory that {written_by} wrote.")
    processor = LeanVLMProcessor.from_pretrained(model_dir)
    overrides = {}
    if variant is not None:
        _, decoder, options = parse_variant(variant)
        overrides = {"decoder": decoder, **options}
    model, info = LeanVLMForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True, **overrides)
    differ = {kind: info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[kind]}
    if variant is not None and differ:
        keys = "; ".join(f"{kind.replace('_', ' ')}: {listed(map(str, names), 4)}" for kind, names in differ.items())
        raise ValueError(f"{model_dir} cannot run as {variant}: its parameters differ ({keys}). A policy can "
                         "take over a saved model only when it has the same parameters, e.g. a trained vanilla model "
                         "runs as random, pool or divprune, as vica when it has no crop newlines, or with "
                         "vanilla+frozen_vision_layers=[...].")
    return model.eval().to("cuda" if torch.cuda.is_available() else "cpu"), processor


def run(model_dir: str, data: str, image_root: str | None = None, batch_size: int = 16, max_new_tokens: int = 16,
        max_samples: int | None = None, console=None, metric: str = "exact_match", variant: str | None = None) -> dict:
    """`metric` scores of a saved model on the first `max_samples` records of a LLaVA-format file (all by
    default); relative image paths start from `image_root`, default the file's directory. `variant` runs the model
    under another decoder policy with the same parameters (`load_model`)."""
    from leanvlm.data.llava import read_records

    model, processor = load_model(model_dir, variant)
    records = read_records(data)[:max_samples]
    root = image_root or os.path.dirname(os.path.realpath(data))
    result = evaluate(model, processor, records, root, batch_size, max_new_tokens, source=data, console=console,
                      metric=metric)
    return {"model": model_dir, "decoder": variant or model.config.decoder, "data": data, **result}


def render(result: dict, console, out: str) -> None:
    """The results table and where the full results went."""
    title = f"{METRIC_TITLES[result['metric']]}: {result['model']} ({result['decoder']}) on {result['data']}"
    console.print(results_table(result, title=title))
    console.print(f"wrote {out}")
