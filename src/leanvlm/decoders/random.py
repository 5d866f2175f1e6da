"""`random`: each crop keeps a random subset of its projected tokens, the strong baseline of token-reduction studies
(UniPruneBench, arXiv 2511.02650). One subset of token positions, drawn from a generator seeded with `random_seed`,
serves every crop of every image, in spatial order: the selection depends on nothing in the batch, so batched
decoding equals decoding one by one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from leanvlm.decoders.base import Preset
from leanvlm.decoders.reduction import ReductionDecoder, ReductionOptions


@dataclass
class RandomOptions(ReductionOptions):
    """The budget (`keep_tokens` or `keep_ratio`), and `random_seed`, which seeds the draw of the kept positions."""

    random_seed: int = 0

    def resolved(self, num_layers: int) -> RandomOptions:
        if isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int) or self.random_seed < 0:
            raise ValueError(f"random_seed must be an int >= 0, got {self.random_seed!r}.")
        return super().resolved(num_layers)


def random_positions(tokens: int, budget: int, seed: int) -> torch.Tensor:
    """`budget` of the positions 0..tokens-1, drawn with `seed`, in increasing order."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(tokens, generator=generator)[:budget].sort().values


class RandomDecoder(ReductionDecoder):
    name = "random"
    Options = RandomOptions
    presets: ClassVar[dict[str, Preset]] = {"keep_5": Preset({"keep_tokens": 5, "random_seed": 1})}

    @classmethod
    def select(cls, tokens: torch.Tensor, grid, budget: int, options: RandomOptions):
        positions = random_positions(tokens.shape[1], budget, options.random_seed).to(tokens.device)
        return tokens[:, positions], None  # (n_crops, budget, d): a subset forms no grid
