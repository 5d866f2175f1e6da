"""`divprune` (DivPrune, CVPR 2025, arXiv 2503.02175): each crop keeps the projected tokens of a max-min diversity
problem, the subset whose smallest pairwise cosine distance (1 - cosine similarity) is largest, approximated by a
greedy farthest-point traversal. The first token is the one whose nearest other token is farthest, the rule of the
DivPrune selection in ModelTC/llmc (`llmc/compression/token_reduction/divprune.py`); each next token is the one
farthest (by its smallest distance) from those already kept, and no token is kept twice. The kept tokens stay in
their original order. The traversal is a 2-approximation of the optimum in Euclidean distance between the
normalised tokens, which orders pairs as the cosine distance does."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from leanvlm.decoders.base import Preset
from leanvlm.decoders.cost import PrefillShape
from leanvlm.decoders.reduction import ReductionDecoder, ReductionOptions


def max_min_diverse(tokens: torch.Tensor, budget: int) -> torch.Tensor:
    """tokens (n_crops, N, d) -> indices (n_crops, budget) of each crop's greedy max-min diverse subset, ascending."""
    unit = F.normalize(tokens.float(), dim=-1)  # fp32: bf16 similarities would tie
    distance = 1 - unit @ unit.transpose(1, 2)  # (n_crops, N, N), the one matmul of the selection
    crops, n = distance.shape[:2]
    rows = torch.arange(crops, device=tokens.device)
    itself = torch.eye(n, dtype=torch.bool, device=tokens.device)
    score = distance.masked_fill(itself, float("inf")).amin(dim=2)  # (n_crops, N): distance to the nearest other
    kept = torch.zeros(crops, n, dtype=torch.bool, device=tokens.device)
    picks = []
    for step in range(budget):
        pick = score.masked_fill(kept, float("-inf")).argmax(dim=1)  # (n_crops,)
        picks.append(pick)
        kept[rows, pick] = True
        to_pick = distance[rows, pick]  # (n_crops, N)
        score = to_pick if step == 0 else torch.minimum(score, to_pick)  # distance to the kept set
    return torch.stack(picks, dim=1).sort(dim=1).values


class DivPruneDecoder(ReductionDecoder):
    name = "divprune"
    presets: ClassVar[dict[str, Preset]] = {"keep_5": Preset({"keep_tokens": 5}),
                                            "ratio": Preset({"keep_ratio": 0.25})}

    @classmethod
    def selection_macs(cls, shape: PrefillShape, options: ReductionOptions) -> dict[str, float]:
        """Every crop's pairwise similarities (N x N x d) when it is cut."""
        per_crop = shape.vision_tokens // shape.crops
        if options.budget(per_crop) == per_crop:
            return {}
        return {"similarity": shape.crops * per_crop**2 * shape.llm.hidden}

    @classmethod
    def select(cls, tokens: torch.Tensor, grid, budget: int, options: ReductionOptions):
        picks = max_min_diverse(tokens, budget)  # (n_crops, budget)
        return tokens.gather(1, picks[..., None].expand(-1, -1, tokens.shape[-1])), None  # a subset forms no grid
