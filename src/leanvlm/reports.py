"""One writer for the files a measurement leaves behind: NAME.json (the report itself), NAME.md (its table) and
NAME.png (its plot), side by side in one directory. The callers own what goes into each file."""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable

from matplotlib.figure import Figure


def write_json(path: str, data) -> str:
    """`data` as indented JSON at `path`, creating its directory."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return path


def write_report(report: dict, out_dir: str, name: str, *, markdown: str | None = None,
                 plot: Callable[[dict], Figure] | None = None, dpi: int = 120) -> list[str]:
    """Write `out_dir`/NAME.json, then NAME.md when `markdown` is given and NAME.png drawn by `plot(report)` when
    that is given; return the paths written, in that order."""
    paths = [write_json(os.path.join(out_dir, f"{name}.json"), report)]
    if markdown is not None:
        paths.append(os.path.join(out_dir, f"{name}.md"))
        with open(paths[-1], "w") as f:
            f.write(markdown)
    if plot is not None:
        paths.append(os.path.join(out_dir, f"{name}.png"))
        plot(report).savefig(paths[-1], dpi=dpi)
    return paths


def figure(columns: int, size: tuple[float, float]) -> tuple[Figure, list]:
    """A figure of `columns` side-by-side axes. Built without pyplot: no GUI backend, nothing global to close."""
    canvas = Figure(figsize=size)
    axes = canvas.subplots(1, columns)
    return canvas, list(axes) if columns > 1 else [axes]


def listed(items, limit: int) -> str:
    """The first `limit` of `items` (sorted), joined with commas, and how many more there are: for messages."""
    items = sorted(items)
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def short_label(label: str, width: int = 40) -> str:
    """A variant label for a plot axis: lists of evenly spaced layers written as ranges, e.g.
    `vanilla+frozen_vision_layers=[12,13,...,29]` -> `vanilla+frozen_vision_layers=[12..29]`, `[0,4,8,...,28]` ->
    `[0..28/4]`; a label longer than `width` characters breaks before its options' `+` signs, so that it fits
    beside an axis."""

    def compress(match: re.Match) -> str:
        values = [int(v) for v in match.group(1).split(",")]
        steps = {b - a for a, b in itertools.pairwise(values)}
        if len(values) < 3 or len(steps) != 1 or steps == {0}:
            return match.group(0)
        step = steps.pop()
        return f"[{values[0]}..{values[-1]}" + ("]" if step == 1 else f"/{step}]")

    lines = [""]
    for i, part in enumerate(re.sub(r"\[(-?\d+(?:,\s*-?\d+)+)\]", compress, label).split("+")):
        piece = part if i == 0 else "+" + part
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append(piece)
        else:
            lines[-1] += piece
    return "\n".join(lines)
