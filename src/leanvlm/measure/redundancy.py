"""How much the decoder layers change vision tokens compared with text tokens (the redundancy that motivates HiMix
and ProxyV): per layer, the cosine similarity of each token's hidden state with its state one layer earlier and with
its input embedding, separately for vision and text tokens, and the cosine between the mean vision and mean text
states."""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

METRICS = ("vision_vs_previous", "text_vs_previous", "vision_vs_input", "text_vs_input", "cross_modal")


class RedundancyStats:
    """Sums over batches of per-layer token cosines, so any number of samples can be streamed through."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}
        self.counts: dict[str, list[float]] = {}
        self.samples = 0

    def add(self, model, batch: dict) -> None:
        if model.config.decoder not in ("vanilla", "proxyv"):
            raise ValueError(
                f"The redundancy analysis reads vision tokens' hidden states; the {model.config.decoder!r} decoder "
                "keeps no vision tokens in the sequence. Use a vanilla (or proxyv) model."
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


def save_redundancy(result: dict, out_dir: str, title: str = "") -> tuple[str, str]:
    """Write redundancy.json and redundancy.png into `out_dir`; return both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    os.makedirs(out_dir, exist_ok=True)
    json_path, png_path = os.path.join(out_dir, "redundancy.json"), os.path.join(out_dir, "redundancy.png")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    layers = [row["layer"] for row in result["layers"]]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
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
    figure.suptitle(title or f"Layer-wise similarity of vision and text tokens ({result['samples']} samples)")
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return json_path, png_path
