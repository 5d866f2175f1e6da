"""One writer for the files a measurement leaves behind: NAME.json (the report itself), NAME.md (its table) and
NAME.png (its plot), side by side in one directory. The callers own what goes into each file."""

from __future__ import annotations

import json
import os
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
