"""`pyramiddrop` (PyramidDrop, arXiv 2410.17247): the vision tokens are dropped in stages. At each of
`pyramid_layers` (None: a quarter, half and three quarters of the depth, as layers 8, 16 and 24 of 32), each crop
keeps the `pyramid_keep` fraction of the tokens it still has (0.5: half, a quarter, an eighth), the ones the last
token attended to most in the layer before. Training-free on a trained vanilla model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from leanvlm.decoders.base import PolicyOptions, Preset, layer_set
from leanvlm.decoders.drop import DropDecoder

DEPTH_FRACTIONS = (0.25, 0.5, 0.75)


@dataclass
class PyramidDropOptions(PolicyOptions):
    """`pyramid_layers`: the layers (1..L-1) from which each further drop applies (None: 1/4, 1/2 and 3/4 of the
    depth, rounded, at least 1); `pyramid_keep`: the fraction in (0, 1) of its remaining tokens a crop keeps at each
    of them (rounded half up, at least 1)."""

    pyramid_layers: list[int] | None = None
    pyramid_keep: float = 0.5

    def resolved(self, num_layers: int) -> PyramidDropOptions:
        if self.pyramid_layers is None:
            self.pyramid_layers = sorted({max(1, math.floor(num_layers * f + 0.5)) for f in DEPTH_FRACTIONS})
        self.pyramid_layers = layer_set("pyramid_layers", self.pyramid_layers, num_layers)
        if 0 in self.pyramid_layers:
            raise ValueError("pyramid_layers cannot hold layer 0: a drop is ranked by the layer before it.")
        keep = self.pyramid_keep
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep < 1:
            raise ValueError(f"pyramid_keep must be a fraction in (0, 1) of the tokens each stage keeps, got {keep!r}.")
        return self


class PyramidDropDecoder(DropDecoder):
    name = "pyramiddrop"
    Options = PyramidDropOptions
    options_are = "a pyramiddrop option"
    presets: ClassVar[dict[str, Preset]] = {"one_stage_keep_third": Preset({"pyramid_layers": [2],
                                                                            "pyramid_keep": 0.3})}

    @classmethod
    def stages(cls, options: PyramidDropOptions, tokens: int) -> list[tuple[int, int]]:
        stages = []
        for layer in options.pyramid_layers:
            kept = max(1, math.floor(options.pyramid_keep * tokens + 0.5))
            if kept < tokens:
                stages.append((layer, kept))
                tokens = kept
        return stages
