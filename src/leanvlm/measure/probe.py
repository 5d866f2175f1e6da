"""Encoder probe: how much of each ShapesVQA question family a frozen encoder's features can answer at all.

A small question-conditioned reader is trained on cached features of the training images and scored on the test
images, per family. It sees the question as a bag of words; several attention heads, queried by the question, pool
the (layer-normed, position-embedded) patch tokens; a one-hidden-layer MLP maps the pooled vectors and the question
to one of the data set's answers. Whatever this reader cannot answer from the features, a decoder reading the same
features is unlikely to answer either; what it can, a decoder should be able to learn. Layers can be joined
(`8,11`: their features side by side), as a multi-layer connector would take them.
"""

from __future__ import annotations

import math
import os
import re
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from leanvlm.reports import figure, write_report
from leanvlm.stats import wilson_interval

WORD = re.compile(r"[a-z]+|\d+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class AttentionProbe(nn.Module):
    """Question words -> `heads` attention queries over the patch tokens -> MLP -> answer logits."""

    def __init__(self, feature_dim: int, num_tokens: int, vocabulary: int, answers: int, heads: int = 4,
                 width: int = 64):
        super().__init__()
        self.heads, self.width = heads, width
        self.question = nn.EmbeddingBag(vocabulary, width, mode="mean")
        self.norm = nn.LayerNorm(feature_dim)
        self.position = nn.Parameter(torch.zeros(num_tokens, width))
        self.keys = nn.Linear(feature_dim, heads * width)
        self.values = nn.Linear(feature_dim, heads * width)
        self.queries = nn.Linear(width, heads * width)
        self.head = nn.Sequential(nn.Linear((heads + 1) * width, 2 * width), nn.GELU(), nn.Linear(2 * width, answers))

    def forward(self, features: torch.Tensor, word_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        n, tokens, _ = features.shape
        x = self.norm(features.float())  # (n, N, d_v)
        question = self.question(word_ids, offsets)  # (n, w)
        position = self.position.repeat(1, self.heads)  # (N, h*w): the same position code in every head
        keys = (self.keys(x) + position).view(n, tokens, self.heads, self.width)
        values = (self.values(x) + position).view(n, tokens, self.heads, self.width)
        queries = self.queries(question).view(n, 1, self.heads, self.width)
        weights = ((keys * queries).sum(-1) / math.sqrt(self.width)).softmax(dim=1)  # (n, N, h)
        pooled = (weights.unsqueeze(-1) * values).sum(1).flatten(1)  # (n, h*w)
        return self.head(torch.cat([pooled, question], dim=-1))


def encode_questions(questions: list[str], vocabulary: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Questions -> (word ids, offsets) for `nn.EmbeddingBag`; unknown words map to id 0."""
    ids, offsets = [], []
    for question in questions:
        offsets.append(len(ids))
        ids += [vocabulary.get(w, 0) for w in words(question)] or [0]
    return torch.tensor(ids), torch.tensor(offsets)


def batch_questions(word_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor([0, *[len(w) for w in word_lists[:-1]]]).cumsum(0)
    return torch.tensor([i for w in word_lists for i in w]), offsets


def train_probe(train: dict, test: dict, steps: int = 1500, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                progress=None) -> list[int]:
    """Fit an `AttentionProbe` on `train` and return its predicted answer index for every `test` sample. Each split
    is {"features": (n, N, d_v), "questions": [[word id, ...]], "answers": (n,) answer indices}."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    features = train["features"]
    vocabulary = 1 + max(i for w in train["questions"] + test["questions"] for i in w)
    answers = 1 + int(max(train["answers"].max(), test["answers"].max()))
    probe = AttentionProbe(features.shape[-1], features.shape[1], vocabulary, answers)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    probe.train()
    for _ in range(steps):
        chosen = torch.randint(len(features), (batch_size,), generator=generator)
        word_ids, offsets = batch_questions([train["questions"][i] for i in chosen.tolist()])
        loss = F.cross_entropy(probe(features[chosen], word_ids, offsets), train["answers"][chosen])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(1)
    probe.eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(test["features"]), 256):
            word_ids, offsets = batch_questions(test["questions"][start : start + 256])
            predictions += probe(test["features"][start : start + 256], word_ids, offsets).argmax(-1).tolist()
    return predictions


def parse_layer_sets(texts: list[str]) -> list[tuple[int, ...]]:
    """["11", "8,11"] -> [(11,), (8, 11)]: each entry one probe, its layers' features side by side."""
    sets = []
    for text in texts:
        try:
            sets.append(tuple(int(part) for part in text.split(",")))
        except ValueError:
            raise ValueError(f"Layer set {text!r}: use hidden-state indices separated by commas, e.g. 11 or 8,11."
                             ) from None
    return sets


def load_split(path: str, image_root: str, cache, layers: list[int], vocabulary: dict, answer_ids: dict,
               limit: int | None) -> dict:
    """A ShapesVQA split's cached features {layer: (n, N, d_v)}, question word ids, answer indices and families."""
    from leanvlm.data.llava import read_records, record_image_paths

    records = read_records(path)[:limit]
    features = {layer: [] for layer in layers}
    questions, answers, families = [], [], []
    for record in records:
        turns = record["conversations"]
        question = next(t["value"] for t in turns if t["from"] == "human")
        (image,) = record_image_paths(record, image_root)
        for layer, tensor in cache.image_features(image, layers).items():
            features[layer].append(tensor[0])  # the one crop
        for word in words(question):
            vocabulary.setdefault(word, len(vocabulary))
        questions.append([vocabulary[w] for w in words(question)])
        answers.append(answer_ids.setdefault(turns[-1]["value"], len(answer_ids)))
        families.append(record.get("family"))
    return {"features": {k: torch.stack(v) for k, v in features.items()}, "questions": questions,
            "answers": torch.tensor(answers), "families": families}


def run(data: str, layer_sets: list[str], vision: str = "dinov2-s14", steps: int = 1500, train_limit: int | None = None,
        seed: int = 0, tome_r: int = 0, console=None) -> dict:
    """Probe accuracy per family and layer set on a ShapesVQA directory (train.json -> test.json), with the features
    encoded into `data`/features (shared with training) first when missing; `tome_r` merges tokens in the encoder
    (`leanvlm.tome`), which then leaves fewer of them, in no spatial order."""
    from rich.progress import Progress

    from leanvlm.data.features import FeatureCache, encode_data
    from leanvlm.data.synthetic import ANSWERS

    sets = parse_layer_sets(layer_sets)
    if tome_r and any(len(s) > 1 for s in sets):
        raise ValueError(f"tome_r={tome_r} leaves a different number of tokens after each encoder layer, so layers "
                         "cannot be joined side by side; probe one layer per --layer.")
    layers = sorted({layer for s in sets for layer in s})
    files = [os.path.join(data, f"{split}.json") for split in ("train", "test")]
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found; write a ShapesVQA directory with `leanvlm data synth`.")
    out = os.path.join(data, "features")
    with Progress(console=console, disable=console is None) as bar:
        task = bar.add_task("encoding images", total=None)
        encoded = encode_data(files, out, vision=vision, layers=layers, tome_r=tome_r,
                              progress=lambda done, total: bar.update(task, advance=done, total=total))
    cache = FeatureCache(out, encoded["signature"])
    vocabulary, answer_ids = {"<unk>": 0}, {}
    train = load_split(files[0], data, cache, layers, vocabulary, answer_ids, train_limit)
    test = load_split(files[1], data, cache, layers, vocabulary, answer_ids, None)
    results = {}
    for layer_set in sets:
        name = ",".join(map(str, layer_set))
        started = time.perf_counter()
        with Progress(console=console, disable=console is None) as bar:
            task = bar.add_task(f"probe on layer(s) {name}", total=steps)
            joined = {split: {**s, "features": torch.cat([s["features"][k] for k in layer_set], dim=-1)}
                      for split, s in (("train", train), ("test", test))}
            predictions = train_probe(joined["train"], joined["test"], steps, seed=seed,
                                      progress=partial(bar.advance, task))
        correct = [p == a for p, a in zip(predictions, test["answers"].tolist(), strict=True)]
        results[name] = {"accuracy": score(correct), "families": {
            family: score([c for c, f in zip(correct, test["families"], strict=True) if f == family])
            for family in sorted(set(test["families"]))}, "seconds": round(time.perf_counter() - started, 1)}
    priors = {family: 1 / len(answers) for family, answers in ANSWERS.items()}
    return {"data": data, "vision": vision, "tome_r": tome_r, "train_samples": len(train["answers"]),
            "test_samples": len(test["answers"]), "steps": steps, "chance": priors, "results": results}


def score(correct: list[bool]) -> dict:
    right = sum(correct)
    low, high = wilson_interval(right, len(correct))
    return {"accuracy": right / len(correct), "ci95": [low, high], "samples": len(correct)}


def markdown(report: dict) -> str:
    families = sorted({f for r in report["results"].values() for f in r["families"]})
    header = ["layers", "overall", *families]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             "| chance (1 / answers) | - | " + " | ".join(f"{report['chance'][f]:.0%}" for f in families) + " |"]
    for name, r in report["results"].items():
        cells = [f"{r['accuracy']['accuracy']:.1%}"]
        cells += [f"{r['families'][f]['accuracy']:.0%}" for f in families]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict):
    """Per-family probe accuracy (with 95% intervals) for each layer set; chance (1 / answers) as a tick."""
    canvas, (axis,) = figure(1, (10, 4))
    families = sorted(report["chance"])
    names = list(report["results"])
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        fams = report["results"][name]["families"]
        xs = [j + i * width for j in range(len(families))]
        values = [100 * fams[f]["accuracy"] if f in fams else 0 for f in families]
        errors = [[100 * (fams[f]["accuracy"] - fams[f]["ci95"][0]) if f in fams else 0 for f in families],
                  [100 * (fams[f]["ci95"][1] - fams[f]["accuracy"]) if f in fams else 0 for f in families]]
        axis.bar(xs, values, width, yerr=errors, label=f"layer(s) {name}", capsize=2)
    axis.scatter([j + 0.4 - width / 2 for j in range(len(families))],
                 [100 * report["chance"][f] for f in families], marker="_", s=400, color="black",
                 label="chance (1 / answers)", zorder=3)
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(families))], families)
    axis.set_ylabel("probe test accuracy (%)")
    axis.set_title(f"What frozen {report['vision']} features support (question-conditioned attention probe)")
    axis.legend(fontsize=8)
    canvas.tight_layout()
    return canvas


def write(report: dict, out: str) -> list[str]:
    return write_report(report, out, "probe", markdown=markdown(report), plot=plot)
