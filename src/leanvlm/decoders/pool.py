"""`pool`: each crop's patch grid of projected tokens is average-pooled (`F.adaptive_avg_pool2d`) down to the budget:
k tokens give a floor(sqrt(k)) x floor(sqrt(k)) grid, each side at most the crop's own (so up to k tokens, fewer when
k is no square). The token-level counterpart of image down-sampling, which VTC-Bench (arXiv 2510.07143) finds to
beat many compression methods."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from leanvlm.decoders.base import Preset
from leanvlm.decoders.reduction import ReductionDecoder, ReductionOptions


def pooled_grid(grid: tuple[int, int], budget: int) -> tuple[int, int]:
    """The grid a budget of tokens pools a rows x cols grid to."""
    side = math.isqrt(budget)
    return min(side, grid[0]), min(side, grid[1])


class PoolDecoder(ReductionDecoder):
    name = "pool"
    needs_patch_grid = True
    keeps_patch_grid = True
    presets: ClassVar[dict[str, Preset]] = {"keep_4": Preset({"keep_tokens": 4}), "ratio": Preset({"keep_ratio": 0.6})}

    @classmethod
    def kept_per_crop(cls, tokens: int, options: ReductionOptions) -> int:
        budget = options.budget(tokens)
        if budget == tokens:
            return tokens
        side = math.isqrt(tokens)  # square crops assumed (an estimate otherwise), as the grid is not known here
        rows, cols = pooled_grid((side, side), budget)
        return rows * cols

    @classmethod
    def select(cls, tokens: torch.Tensor, grid, budget: int, options: ReductionOptions):
        if grid is None:
            raise ValueError(
                f"The pool decoder averages each crop's patch grid, but these {tokens.shape[1]} tokens per crop form "
                "no known grid. Pass the grid=(rows, cols) of the features to context_from_features, or use the "
                "random or divprune decoder, which take the tokens as a set."
            )
        small = pooled_grid(grid, budget)
        crops = tokens.transpose(1, 2).unflatten(2, grid)  # (n_crops, d, rows, cols)
        pooled = F.adaptive_avg_pool2d(crops, small)  # (n_crops, d, r, c)
        return pooled.flatten(2).transpose(1, 2), small  # (n_crops, r * c, d), row-major
