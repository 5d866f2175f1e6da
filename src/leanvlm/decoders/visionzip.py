"""`visionzip` (VisionZip, arXiv 2412.04467): each crop keeps its budget of tokens, chosen on the encoder's side before
the connector.

- Dominant tokens: those the encoder's attention favours in the layer that outputs the feature layer: the attention
  the CLS token pays them where the encoder has a CLS token (CLIP, DINOv2), else the attention they receive averaged
  over every query (SigLIP); averaged over heads. They stay as they are, in their original order.
- Contextual tokens: the rest is not dropped but merged. Evenly spaced tokens of the rest (every
  (rest // contextual)-th, in order) are targets; every other remaining token joins the target whose key (averaged
  over heads, same layer) is most cosine-similar to its own, and each target becomes the mean of itself and the
  tokens that joined it.

The connector then projects the dominant tokens followed by the contextual ones (the budget, not every token). The
attention scores and keys come from the encoder run itself (`leanvlm.decoders.base.attention_key`, cached with the
features), so the encoder keeps running on SDPA. Dominant tokens are picked from the tokens the model reads
(`vision_feature_select`: the patches, without CLS, by default), where VisionZip's LLaVA code also keeps CLS. The
parameters are vanilla's: a trained vanilla checkpoint loads into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from leanvlm.decoders.base import Preset, attention_key
from leanvlm.decoders.cost import PrefillShape
from leanvlm.decoders.reduction import ReductionDecoder, ReductionOptions

# VisionZip's split of a budget: 54 dominant + 10 contextual tokens of 64 (108 + 20 of 128, 162 + 30 of 192).
CONTEXTUAL_SHARE = 10 / 64


@dataclass
class VisionZipOptions(ReductionOptions):
    """The budget (`keep_tokens` or `keep_ratio`), and `visionzip_contextual`: how many of a crop's kept tokens are
    merged contextual tokens (the others are dominant), at most the budget - 1; None takes VisionZip's share, 10 of
    every 64, rounded half up."""

    visionzip_contextual: int | None = None

    def resolved(self, num_layers: int) -> VisionZipOptions:
        contextual = self.visionzip_contextual
        if contextual is not None and (isinstance(contextual, bool) or not isinstance(contextual, int)
                                       or contextual < 0):
            raise ValueError(f"visionzip_contextual must be an int >= 0 (merged tokens per crop) or None for "
                             f"VisionZip's share of the budget, got {contextual!r}.")
        resolved = super().resolved(num_layers)
        if contextual is not None and self.keep_ratio is None:
            self.split(self.keep_tokens + 1)  # refuses a split of the budget (the ratio's is known per crop)
        return resolved

    def split(self, tokens: int) -> tuple[int, int]:
        """(dominant, contextual) tokens kept of a crop of `tokens`, when the budget is below `tokens`."""
        budget = self.budget(tokens)
        contextual = self.visionzip_contextual
        if contextual is None:
            contextual = math.floor(budget * CONTEXTUAL_SHARE + 0.5)
        if contextual >= budget:
            raise ValueError(f"visionzip_contextual={contextual} leaves no dominant token in a budget of {budget} "
                             f"tokens per crop; set it below {budget}.")
        return budget - contextual, contextual


def contextual_targets(rest: int, contextual: int) -> torch.Tensor:
    """Positions (among the `rest` remaining tokens, in order) of the `contextual` evenly spaced targets."""
    return torch.arange(0, rest, max(1, rest // contextual))[:contextual]


def zip_tokens(hidden: torch.Tensor, summary: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """hidden (n, N, d_v) features and their attention summary (n, N, 1 + D) -> (n, dominant + contextual, d_v): the
    dominant tokens in their original order, then the contextual tokens in their targets' order."""
    n, tokens, width = hidden.shape
    score, keys = summary[..., 0].float(), summary[..., 1:]

    def rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # tensor (n, N, c), index (n, k)
        return tensor.gather(1, index[..., None].expand(-1, -1, tensor.shape[-1]))

    top = score.topk(dominant, dim=1).indices.sort(dim=1).values  # (n, dominant)
    kept = rows(hidden, top)
    if contextual == 0:
        return kept
    is_rest = torch.ones(n, tokens, dtype=torch.bool, device=hidden.device).scatter_(1, top, False)
    rest = torch.arange(tokens, device=hidden.device).expand(n, tokens)[is_rest].view(n, tokens - dominant)
    target_at = contextual_targets(tokens - dominant, contextual).to(hidden.device)
    is_target = torch.zeros(tokens - dominant, dtype=torch.bool, device=hidden.device)
    is_target[target_at] = True
    targets, others = rest[:, target_at], rest[:, ~is_target]  # (n, contextual), (n, rest - contextual)
    unit = F.normalize(keys.float(), dim=-1)
    similarity = rows(unit, others) @ rows(unit, targets).transpose(1, 2)  # (n, rest - contextual, contextual)
    joins = similarity.argmax(dim=2)  # (n, rest - contextual): the target each other token joins
    sums = rows(hidden, targets).float().scatter_add(1, joins[..., None].expand(-1, -1, width),
                                                    rows(hidden, others).float())
    counts = torch.ones(n, contextual, device=hidden.device)  # each target counts itself
    counts = counts.scatter_add(1, joins, torch.ones_like(joins, dtype=counts.dtype))
    return torch.cat([kept, (sums / counts[..., None]).to(hidden.dtype)], dim=1)


class VisionZipDecoder(ReductionDecoder):
    name = "visionzip"
    Options = VisionZipOptions
    reduces_encoder_features = True
    presets: ClassVar[dict[str, Preset]] = {
        "keep_5": Preset({"keep_tokens": 5}),
        "keep_8_contextual_3": Preset({"keep_tokens": 8, "visionzip_contextual": 3}),
        "ratio": Preset({"keep_ratio": 0.25}),
    }

    @classmethod
    def feature_keys(cls, config) -> list:
        return [*cls.feature_layers(config), attention_key(config.vision_feature_layer)]

    @classmethod
    def features_to_project(cls, features: dict, layer: int, options: VisionZipOptions) -> torch.Tensor:
        hidden = features[layer]
        if options.budget(hidden.shape[1]) == hidden.shape[1]:  # the whole crop: exactly vanilla
            return hidden
        return zip_tokens(hidden, features[attention_key(layer)], *options.split(hidden.shape[1]))

    @classmethod
    def reduce(cls, tokens: torch.Tensor, grid: tuple[int, int] | None, options: VisionZipOptions):
        """The tokens were cut before the connector; they form the encoder's grid only when all were kept."""
        return tokens, grid if grid is not None and grid[0] * grid[1] == tokens.shape[1] else None

    @classmethod
    def selection_macs(cls, shape: PrefillShape, options: VisionZipOptions) -> dict[str, float]:
        """Every crop's key similarities of the tokens to merge against the targets (the encoder's attention comes
        with its own run)."""
        per_crop = shape.vision_tokens // shape.crops
        if options.budget(per_crop) == per_crop:
            return {}
        dominant, contextual = options.split(per_crop)
        if contextual == 0:
            return {}
        key_width = shape.vision_width // shape.vision_heads
        return {"merging": shape.crops * (per_crop - dominant - contextual) * contextual * key_width}

