"""LLaVA-format data: records {"id", "image" (path or list, optional), "conversations": [{"from", "value"}, ...]} in
JSON (a list) or JSONL, tokenized with a conversation template, labels only on assistant turns."""

from __future__ import annotations

import json
import os
import warnings

import torch
from PIL import Image

from leanvlm.config import IMAGE_TOKEN
from leanvlm.data.templates import segments, to_messages
from leanvlm.decoders.base import IGNORE_INDEX


def read_records(path: str) -> list[dict]:
    """JSON list or JSONL; a syntax error names the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Data file {path!r} does not exist.")
    with open(path) as f:
        text = f.read()
    if path.endswith(".jsonl"):
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: invalid JSON ({error.msg}).") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {error.lineno}: invalid JSON ({error.msg}).") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records.")
    return records


def record_image_paths(record: dict, root: str) -> list[str]:
    """A record's image paths ("image": one path or a list), relative ones resolved against `root`."""
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    return [p if os.path.isabs(p) else os.path.join(root, p) for p in images]


def data_image_paths(path: str, image_root: str | None = None) -> list[str]:
    """Every image a LLaVA-format file refers to (relative paths resolve against `image_root`, default the file's
    directory); a missing image is an error naming its record."""
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    paths = []
    for index, record in enumerate(read_records(path)):
        if not isinstance(record, dict):
            raise ValueError(f"{path}, record {index}: expected an object with 'conversations'.")
        for image in record_image_paths(record, root):
            if not os.path.isfile(image):
                raise FileNotFoundError(f"{path}, record {index} (id {record.get('id')!r}): image {image!r} not found.")
            paths.append(image)
    return paths


class LLaVADataset(torch.utils.data.Dataset):
    """Tokenized samples: `input_ids`, `labels` (IGNORE_INDEX outside assistant turns) and the sample's images.

    on_missing_image: "error" (default) names the record and the path; "skip" drops such records and counts them in
    `skipped`. Samples longer than `max_length` are cut (images whose placeholder is cut are dropped) and counted in
    `truncated`, with one warning.
    """

    def __init__(self, path: str, processor, template: str = "chat", image_root: str | None = None,
                 max_length: int = 2048, on_missing_image: str = "error", feature_cache=None, feature_keys=None):
        if on_missing_image not in ("error", "skip"):
            raise ValueError("on_missing_image must be 'error' or 'skip'.")
        self.processor, self.template, self.max_length = processor, template, max_length
        # With a `leanvlm.data.features.FeatureCache`, samples carry cached encoder features instead of images.
        self.feature_cache, self.feature_keys = feature_cache, feature_keys
        root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
        self.records, self.skipped, self.truncated = [], 0, 0
        for index, record in enumerate(read_records(path)):
            where = f"{path}, record {index} (id {record.get('id')!r})" if isinstance(record, dict) else path
            if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
                raise ValueError(f"{where}: a record needs a 'conversations' list.")
            to_messages(record["conversations"], where)  # checks roles now, not mid-training
            paths = record_image_paths(record, root)
            placeholders = sum(t["value"].count(IMAGE_TOKEN) for t in record["conversations"])
            if paths and placeholders == 0:  # LLaVA data may omit the placeholder: the image goes first
                first = next((t for t in record["conversations"] if t.get("from") in ("human", "user")),
                             record["conversations"][0])
                first["value"] = IMAGE_TOKEN * len(paths) + "\n" + first["value"]
            elif placeholders != len(paths):
                raise ValueError(f"{where}: {placeholders} {IMAGE_TOKEN} placeholder(s) but {len(paths)} image(s).")
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                if on_missing_image == "skip":
                    self.skipped += 1
                    continue
                raise FileNotFoundError(f"{where}: image {missing[0]!r} not found (on_missing_image='skip' drops "
                                        "such records).")
            self.records.append((record, paths, where))
        self._warned = False

    def __len__(self) -> int:
        return len(self.records)

    def tokenize(self, index: int) -> tuple[list[int], list[int]]:
        record, _, where = self.records[index]
        tokenizer = self.processor.tokenizer
        ids, labels = [], []
        if self.template != "chat" and tokenizer.bos_token_id is not None:
            ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
        for text, scored in segments(to_messages(record["conversations"], where), self.template, tokenizer):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            piece = [self.processor.image_token_id if t == self.processor.tokenizer_image_id else t for t in piece]
            ids += piece
            labels += piece if scored else [IGNORE_INDEX] * len(piece)
        return ids, labels

    def __getitem__(self, index: int) -> dict:
        ids, labels = self.tokenize(index)
        _, paths, _ = self.records[index]
        if len(ids) > self.max_length:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            self.truncated += 1
            if not self._warned:
                warnings.warn(f"Samples longer than max_length={self.max_length} are truncated (see .truncated).",
                              stacklevel=2)
                self._warned = True
            paths = paths[: ids.count(self.processor.image_token_id)]
        if self.feature_cache is not None:
            cache = self.feature_cache
            features = [cache.image_features(p, self.feature_keys) for p in paths]
            return {"input_ids": ids, "labels": labels, "features": features}
        return {"input_ids": ids, "labels": labels, "images": [Image.open(p).convert("RGB") for p in paths]}

    def image_paths(self) -> list[str]:
        return [p for _, paths, _ in self.records for p in paths]

    def lengths(self) -> list[int]:
        """Token lengths (images counted as one placeholder), for length-grouped sampling."""
        return [len(self.tokenize(i)[0]) for i in range(len(self))]


def stack_features(features: list[dict]) -> tuple[dict, torch.Tensor]:
    """Cached encoder features of several images, {layer: (n_crops, N, d_v)} each -> the model's `vision_features`
    {layer: (all crops, N, d_v)} and `image_crops` (crops per image)."""
    stacked = {layer: torch.cat([f[layer] for f in features]) for layer in features[0]}
    return stacked, torch.tensor([next(iter(f.values())).shape[0] for f in features])


class Collator:
    """Pads a list of samples (right padding, labels IGNORE_INDEX) and preprocesses their images into
    `pixel_values` + `image_crops`, in placeholder order."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, samples: list[dict]) -> dict:
        pad = self.processor.tokenizer.pad_token_id
        length = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), length), pad, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[row, :n] = torch.tensor(sample["input_ids"])
            labels[row, :n] = torch.tensor(sample["labels"])
            mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        features = [image for sample in samples for image in sample.get("features", [])]
        if features:
            batch["vision_features"], batch["image_crops"] = stack_features(features)
            return batch
        images = [image for sample in samples for image in sample.get("images", [])]
        if images:
            batch["pixel_values"], batch["image_crops"] = self.processor.preprocess_images(images)
        return batch


def length_grouped_sampler(dataset: LLaVADataset, batch_size: int, seed: int = 0):
    """Batches of similar length (less padding), in a seeded random order: transformers' LengthGroupedSampler."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    return LengthGroupedSampler(batch_size, lengths=dataset.lengths(), generator=torch.Generator().manual_seed(seed))
