"""How much the decoder layers change vision tokens compared with text tokens (the redundancy that motivates HiMix
and ProxyV): per layer, the cosine similarity of each token's hidden state with its state one layer earlier and with
its input embedding, separately for vision and text tokens, and the cosine between the mean vision and mean text
states."""

from __future__ import annotations

import os
from functools import partial

import torch
import torch.nn.functional as F

from leanvlm.decoders import DECODERS
from leanvlm.reports import figure, write_report

METRICS = ("vision_vs_previous", "text_vs_previous", "vision_vs_input", "text_vs_input", "cross_modal")


class RedundancyStats:
    """Sums over batches of per-layer token cosines, so any number of samples can be streamed through."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}
        self.counts: dict[str, list[float]] = {}
        self.samples = 0

    def add(self, model, batch: dict) -> None:
        if not DECODERS[model.config.decoder].keeps_vision_tokens:
            usable = [name for name, policy in DECODERS.items() if policy.keeps_vision_tokens]
            raise ValueError(
                f"The redundancy analysis reads vision tokens' hidden states; the {model.config.decoder!r} decoder "
                f"keeps no vision tokens in the sequence. Use a model with one of: {', '.join(usable)}."
            )
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
        states = [s.float() for s in out.hidden_states]
        vision = out.vision_mask & out.attention_mask
        text = ~out.vision_mask & out.attention_mask
        for layer in range(1, len(states)):
            current = states[layer]
            self._add(layer, "vision_vs_previous", F.cosine_similarity(current, states[layer - 1], dim=-1), vision)
            self._add(layer, "text_vs_previous", F.cosine_similarity(current, states[layer - 1], dim=-1), text)
            self._add(layer, "vision_vs_input", F.cosine_similarity(current, states[0], dim=-1), vision)
            self._add(layer, "text_vs_input", F.cosine_similarity(current, states[0], dim=-1), text)
            both = vision.any(dim=1) & text.any(dim=1)
            mean_vision = (current * vision[..., None]).sum(1) / vision.sum(1, keepdim=True).clamp(min=1)
            mean_text = (current * text[..., None]).sum(1) / text.sum(1, keepdim=True).clamp(min=1)
            self._add(layer, "cross_modal", F.cosine_similarity(mean_vision, mean_text, dim=-1), both)
        self.samples += batch["input_ids"].shape[0]

    def _add(self, layer: int, metric: str, values: torch.Tensor, where: torch.Tensor) -> None:
        sums = self.sums.setdefault(metric, [])
        counts = self.counts.setdefault(metric, [])
        while len(sums) < layer:
            sums.append(0.0)
            counts.append(0.0)
        sums[layer - 1] += values[where].sum().item()
        counts[layer - 1] += where.sum().item()

    def result(self) -> dict:
        layers = []
        for index in range(len(self.sums.get("vision_vs_previous", []))):
            row = {"layer": index + 1}
            for metric in METRICS:
                count = self.counts[metric][index]
                row[metric] = self.sums[metric][index] / count if count else None
            layers.append(row)
        return {"samples": self.samples, "layers": layers}


def redundancy(model, batches) -> dict:
    """Per-layer similarities over an iterable of processor batches."""
    stats = RedundancyStats()
    for batch in batches:
        stats.add(model, batch)
    return stats.result()


def run(model_dir: str, images: list[str] = (), prompt: str = "<image>\nDescribe the image.", samples: int = 8,
        batch_size: int = 4, seed: int = 0, console=None) -> dict:
    """The per-layer similarities of a saved model on `images` (default: `samples` ShapesVQA pictures), asked
    `prompt`, which holds one <image> placeholder."""
    from PIL import Image
    from rich.progress import track

    from leanvlm.data.synthetic import generate, render, scene_from_dict
    from leanvlm.modeling import LeanVLMForConditionalGeneration
    from leanvlm.processing import LeanVLMProcessor

    if prompt.count("<image>") != 1:
        raise ValueError(f"the prompt needs exactly one <image> placeholder; {prompt!r} has {prompt.count('<image>')}")
    for path in images:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is not a file")
    model = LeanVLMForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = LeanVLMProcessor.from_pretrained(model_dir)
    if images:
        pictures = [Image.open(p).convert("RGB") for p in images]
    else:
        pictures = [render(scene_from_dict(sample["scene"])) for sample in generate(samples, seed)]
    stats = RedundancyStats()
    for start in track(range(0, len(pictures), batch_size), description="Analysing", console=console):
        chunk = pictures[start : start + batch_size]
        stats.add(model, dict(processor(text=[prompt] * len(chunk), images=chunk)))
    return {**stats.result(), "model": model_dir, "decoder": model.config.decoder, "prompt": prompt}


def render_table(result: dict, console) -> None:
    """One row per layer, one column per metric."""
    from rich.table import Table

    table = Table(title=f"Layer-wise cosine similarity ({result['samples']} samples)")
    table.add_column("layer", justify="right")
    for header in ("vision/prev", "text/prev", "vision/input", "text/input", "vision/text"):
        table.add_column(header, justify="right")
    for row in result["layers"]:
        table.add_row(str(row["layer"]), *(f"{row[m]:.3f}" if row[m] is not None else "-" for m in METRICS))
    console.print(table)


def save_redundancy(result: dict, out_dir: str, title: str = "") -> tuple[str, str]:
    """Write redundancy.json and redundancy.png into `out_dir`; return both paths."""
    json_path, png_path = write_report(result, out_dir, "redundancy", plot=partial(plot, title=title))
    return json_path, png_path


def plot(result: dict, title: str = ""):
    """Per layer: each token against its previous layer and its input, and the mean vision against mean text."""
    from matplotlib.ticker import MaxNLocator

    layers = [row["layer"] for row in result["layers"]]
    canvas, axes = figure(3, (15, 4.2))
    panels = [
        ("vs. previous layer", ("vision_vs_previous", "text_vs_previous")),
        ("vs. input embedding", ("vision_vs_input", "text_vs_input")),
        ("mean vision vs. mean text", ("cross_modal",)),
    ]
    for axis, (name, metrics) in zip(axes, panels, strict=True):
        for metric in metrics:
            values = [row[metric] for row in result["layers"]]
            axis.plot(layers, values, marker="o", label=metric.split("_")[0] if len(metrics) > 1 else "cosine")
        axis.set_title(f"cosine similarity {name}")
        axis.set_xlabel("decoder layer")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend()
    canvas.suptitle(title or f"Layer-wise similarity of vision and text tokens ({result['samples']} samples)")
    canvas.tight_layout()
    return canvas
