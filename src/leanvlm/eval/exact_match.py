"""Exact-match evaluation on LLaVA-format questions: each record's last assistant turn is the reference, and the
model answers the conversation before it, greedily and in batches, with the template it was trained with."""

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
from leanvlm.data.templates import generation_prompt, to_messages
from leanvlm.decoders.base import left_pad
from leanvlm.processing import PROCESSOR_FILE
from leanvlm.stats import accuracy_text, wilson_interval

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


def questions(records: list, template: str, tokenizer, image_root: str = ".", source: str = "data") -> list[Question]:
    """Records -> questions. A record that cannot be asked (no assistant turn, bad roles, images that do not match
    the placeholders or do not exist) is an error naming it, before any generation starts."""
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
            prompt[first] = {**prompt[first], "content": IMAGE_TOKEN * len(paths) + "\n" + prompt[first]["content"]}
        elif placeholders != len(paths):
            raise ValueError(f"{where}: {placeholders} {IMAGE_TOKEN} placeholder(s) before the last answer but "
                             f"{len(paths)} image(s).")
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{where}: image {path!r} not found (relative paths start from the image "
                                        f"root {image_root!r}).")
        question = prompt[users[-1]]["content"].replace(IMAGE_TOKEN, "").strip() if users else ""
        asked.append(Question(record.get("id"), record.get("family"), question, reference,
                              generation_prompt(prompt, template, tokenizer), paths))
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


@torch.no_grad()
def answer(model, processor, prompts: list[list[str]], images: list | None = None, image_context=None,
           max_new_tokens: int = 16, streamer=None) -> list[str]:
    """Greedy answers to a batch of prompts, with their images (PIL, in placeholder order) or an `image_context`
    encoded before. Only the new tokens are decoded; special tokens (end of turn, padding) are dropped."""
    input_ids, attention_mask = encode_prompts(processor, prompts)
    device = model.device
    extra = {"image_context": image_context}
    if images:
        pixel_values, extra["image_crops"] = processor.preprocess_images(images)
        extra["pixel_values"] = pixel_values.to(device)
    output = model.generate(input_ids.to(device), attention_mask.to(device), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=processor.tokenizer.pad_token_id, streamer=streamer, **extra)
    new_tokens = output[:, input_ids.shape[1]:].cpu()
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def answer_prior(references: list[str]) -> float:
    """The share of the most common reference answer: what always giving one answer can score, seeing neither
    the image nor the question."""
    counts = Counter(normalize(r) for r in references)
    return max(counts.values()) / len(references) if references else 0.0


def tally(correct: list[bool], references: list[str]) -> dict:
    """samples, correct, accuracy, its 95% interval (Wilson) and the answer prior of one group of questions."""
    right = sum(correct)
    return {"samples": len(correct), "correct": right, "accuracy": right / len(correct) if correct else 0.0,
            "ci95": list(wilson_interval(right, len(correct))), "answer_prior": answer_prior(references)}


def score(asked: list[Question], predictions: list[str]) -> dict:
    """Exact match after `normalize`, overall and per family (records without a family count only overall), each
    with its 95% interval and answer prior (the overall prior averages the families' priors by their size, or is
    the overall majority share when no record has a family)."""
    samples, groups = [], {}
    for question, prediction in zip(asked, predictions, strict=True):
        correct = normalize(prediction) == normalize(question.reference)
        samples.append({"id": question.id, "family": question.family, "question": question.question,
                        "reference": question.reference, "prediction": prediction, "correct": correct})
        if question.family is not None:
            groups.setdefault(question.family, []).append(samples[-1])
    families = {name: tally([s["correct"] for s in group], [s["reference"] for s in group])
                for name, group in sorted(groups.items())}
    overall = tally([s["correct"] for s in samples], [s["reference"] for s in samples])
    if families and len(samples) == sum(f["samples"] for f in families.values()):
        overall["answer_prior"] = sum(f["answer_prior"] * f["samples"] for f in families.values()) / len(samples)
    return {**overall, "families": families, "predictions": samples}


def cached_context(model, feature_cache, paths: list[str]):
    """The image context of `paths` from a `FeatureCache` of this model's encoder (the encoder does not run)."""
    features, crops = stack_features([feature_cache.image_features(p, model.config.feature_layers) for p in paths])
    return model.context_from_features(features, crops)


def evaluate(model, processor, records: list, image_root: str = ".", batch_size: int = 16,
             max_new_tokens: int = 16, progress: bool = True, source: str = "data", console=None,
             feature_cache=None) -> dict:
    """Ask every record's last question with `processor.template` and score the answers (see `score`). `source`
    names the records in error messages; `console` is where the progress bar draws; with a `feature_cache`
    holding these images' features (`leanvlm.data.features`), the encoder does not run."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    asked = questions(records, processor.template, processor.tokenizer, image_root, source)
    if not asked:
        raise ValueError(f"{source}: no records to evaluate.")
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
    result = score(asked, predictions)
    result["template"] = processor.template
    return result


def results_table(result: dict, title: str = "Exact match") -> Table:
    """One row per family, then the overall row: accuracy with its 95% interval, next to the answer prior."""
    table = Table(title=title)
    table.add_column("family")
    for column in ("questions", "correct", "accuracy [95% interval]", "answer prior"):
        table.add_column(column, justify="right")
    for name, counts in [*result["families"].items(), ("overall", result)]:
        table.add_row(name, str(counts["samples"]), str(counts["correct"]),
                      accuracy_text(counts["correct"], counts["samples"]), f"{counts['answer_prior']:.1%}",
                      style="bold" if name == "overall" else None)
    return table


def load_model(model_dir: str):
    """A saved model (in eval mode, on the GPU when there is one) and its processor; a directory without them is
    an error that says which file is missing."""
    from leanvlm.modeling import LeanVLMForConditionalGeneration
    from leanvlm.processing import LeanVLMProcessor

    for name, written_by in (("config.json", "model.save_pretrained(dir)"),
                             (PROCESSOR_FILE, "LeanVLMProcessor.for_model(model, tokenizer).save_pretrained(dir)")):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise FileNotFoundError(f"{model_dir} has no {name}; pass a directory that {written_by} wrote.")
    processor = LeanVLMProcessor.from_pretrained(model_dir)
    model = LeanVLMForConditionalGeneration.from_pretrained(model_dir).eval()
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), processor


def run(model_dir: str, data: str, image_root: str | None = None, batch_size: int = 16, max_new_tokens: int = 16,
        max_samples: int | None = None, console=None) -> dict:
    """Exact match of a saved model on the first `max_samples` records of a LLaVA-format file (all by default);
    relative image paths start from `image_root`, default the file's directory."""
    from leanvlm.data.llava import read_records

    model, processor = load_model(model_dir)
    records = read_records(data)[:max_samples]
    root = image_root or os.path.dirname(os.path.realpath(data))
    result = evaluate(model, processor, records, root, batch_size, max_new_tokens, source=data, console=console)
    return {"model": model_dir, "data": data, **result}


def render(result: dict, console, out: str) -> None:
    """The results table and where the full results went."""
    console.print(results_table(result, title=f"Exact match: {result['model']} on {result['data']}"))
    console.print(f"wrote {out}")
