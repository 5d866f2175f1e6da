"""Learning curves of a run from its log.jsonl: training and validation loss, and validation exact match per
question family, against the global optimizer step (stage boundaries marked)."""

from __future__ import annotations

import itertools
import json

from leanvlm.reports import figure


def read_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(entries: list[dict], title: str = "training"):
    """Loss (left) and per-family validation exact match (right); the right panel is empty without answers."""
    canvas, (loss_axis, accuracy_axis) = figure(2, (11, 4))
    steps = [e["global_step"] for e in entries]
    loss_axis.plot(steps, [e["loss"] for e in entries], label="training loss", lw=1)
    validated = [e for e in entries if "val_loss" in e]
    if validated:
        loss_axis.plot([e["global_step"] for e in validated], [e["val_loss"] for e in validated], "o-",
                       label="validation loss")
    answered = [e for e in entries if "val_exact_match" in e]
    families = sorted({f for e in answered for f in e["val_exact_match"]["families"]})
    for family in families:
        points = [(e["global_step"], e["val_exact_match"]["families"][family]) for e in answered
                  if family in e["val_exact_match"]["families"]]
        accuracy_axis.plot(*zip(*points, strict=True), ".-", lw=1, label=family)
    if answered:
        accuracy_axis.plot([e["global_step"] for e in answered], [e["val_exact_match"]["accuracy"] for e in answered],
                           "k-", lw=2.5, label="overall")
    for axis in (loss_axis, accuracy_axis):
        for previous, entry in itertools.pairwise(entries):
            if entry["stage_index"] != previous["stage_index"]:
                axis.axvline(previous["global_step"], color="grey", ls=":", lw=1)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    loss_axis.set_ylabel("loss (token mean)")
    loss_axis.set_yscale("log")
    loss_axis.legend(fontsize=8)
    accuracy_axis.set_ylabel("validation exact match")
    accuracy_axis.set_ylim(0, 1)
    if answered:
        accuracy_axis.legend(fontsize=7, ncol=2)
    canvas.suptitle(title)
    canvas.tight_layout()
    return canvas
