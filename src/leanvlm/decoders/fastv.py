"""`fastv` (FastV, arXiv 2403.06764): every token runs through the first `fastv_layer` layers; from that layer on,
each crop keeps only the vision tokens the last token attended to most in the layer before (its budget:
`keep_tokens` or `keep_ratio`, as the token reductions'). Training-free on a trained vanilla model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from leanvlm.decoders.base import Preset
from leanvlm.decoders.drop import DropDecoder
from leanvlm.decoders.reduction import ReductionOptions


@dataclass
class FastVOptions(ReductionOptions):
    """`fastv_layer`: the first layer that reads only the kept tokens (FastV's K; 1..L-1), and the budget per crop
    (`keep_tokens` or `keep_ratio`)."""

    fastv_layer: int = 2

    def resolved(self, num_layers: int) -> FastVOptions:
        layer = self.fastv_layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < num_layers:
            raise ValueError(f"fastv_layer must be a decoder layer index in 1..{num_layers - 1} (the first layer "
                             f"that reads only the kept tokens), got {layer!r}.")
        return super().resolved(num_layers)


class FastVDecoder(DropDecoder):
    name = "fastv"
    Options = FastVOptions
    options_are = "a fastv option"
    presets: ClassVar[dict[str, Preset]] = {
        "keep_5_from_layer_1": Preset({"fastv_layer": 1, "keep_tokens": 5}),
        "ratio": Preset({"keep_ratio": 0.3}),
    }

    @classmethod
    def stages(cls, options: FastVOptions, tokens: int) -> list[tuple[int, int]]:
        budget = options.budget(tokens)
        return [(options.fastv_layer, budget)] if budget < tokens else []
