"""What the training-free token-reduction policies share (`random`, `pool`, `divprune`, `visionzip`): a vanilla
(LLaVA) model whose vision tokens are cut down to a budget per crop before the language model reads them.

Most cut the projected tokens (the connector runs on every token); `visionzip` cuts the encoder's features, and the
connector projects the kept ones. Either way the reduction runs where images become an `ImageContext`
(`project_images`, `reduce_tokens`), so cached image contexts and cached encoder features serve these policies as
they serve vanilla.
The parameters are vanilla's, under the same names: a trained vanilla checkpoint loads into any of them
(`from_pretrained(path, decoder="pool", keep_tokens=64)`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from leanvlm.decoders.base import PolicyOptions
from leanvlm.decoders.cost import LayerCost, PrefillShape
from leanvlm.decoders.vanilla import VanillaDecoder, VanillaOptions


@dataclass
class ReductionOptions(PolicyOptions):
    """The budget per crop: `keep_tokens` vision tokens, or with `keep_ratio` (in (0, 1]) that fraction of the
    crop's tokens instead, rounded half up and at least 1; set one of the two. A budget of at least a crop's tokens
    keeps them all, so the model is then exactly vanilla."""

    keep_tokens: int = 64
    keep_ratio: float | None = None

    def resolved(self, num_layers: int) -> ReductionOptions:
        if isinstance(self.keep_tokens, bool) or not isinstance(self.keep_tokens, int) or self.keep_tokens < 1:
            raise ValueError(f"keep_tokens must be an int >= 1 (vision tokens kept per crop), got "
                             f"{self.keep_tokens!r}.")
        if self.keep_ratio is not None:
            ratio = self.keep_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise ValueError(f"keep_ratio must be a fraction in (0, 1] of each crop's tokens (or None to keep "
                                 f"keep_tokens), got {ratio!r}.")
            if "keep_tokens" in self.changed():
                raise ValueError(f"keep_tokens={self.keep_tokens} and keep_ratio={ratio} both set the budget; set "
                                 "one of them.")
        return self

    def budget(self, tokens: int) -> int:
        """How many of a crop's `tokens` to keep."""
        wanted = self.keep_tokens if self.keep_ratio is None else max(1, math.floor(self.keep_ratio * tokens + 0.5))
        return min(wanted, tokens)


class ReductionDecoder(VanillaDecoder):
    """Vanilla's layout, layers and parameters over a subset (or pooling) of each crop's projected tokens. A subclass
    sets `name` and its own `presets` (vanilla's are probes), says what a crop keeps (`select`), where that is not the
    budget, how many tokens (`kept_per_crop`), and what choosing them costs (`selection_macs`). These are classmethods
    of the tokens and the options, so that other policies run a reduction too (proxyv's `proxyv_token_reduction`)."""

    Options = ReductionOptions
    options_are = "a token-reduction option"
    groups = ("connector", "image_newline")
    keeps_patch_grid: ClassVar[bool] = False  # the kept tokens form a grid (spatial ProxyV proxies can pool it)
    reduces_encoder_features: ClassVar[bool] = False  # cuts the encoder's features, before the connector

    def __init__(self, config, language_model: nn.Module):
        super().__init__(config, language_model)
        self.options = self.options_from(config)

    def project_images(self, features: dict) -> torch.Tensor:
        return self.connector(self.features_to_project(features, self.feature_layer, self.options))

    def reduce_tokens(self, tokens: torch.Tensor, grid: tuple[int, int] | None):
        return self.reduce(tokens, grid, self.options)

    @classmethod
    def features_to_project(cls, features: dict, layer: int, options: ReductionOptions) -> torch.Tensor:
        """The encoder features (n_crops, N', d_v) the connector projects, of `features` {key: (n_crops, N, ...)}
        and the feature layer read: every token, unless the policy `reduces_encoder_features`."""
        return features[layer]

    @classmethod
    def reduce(cls, tokens: torch.Tensor, grid: tuple[int, int] | None, options: ReductionOptions):
        """(n_crops, N, d) projected tokens on a rows x cols grid (or None) -> the kept tokens and the grid they form
        (or None), with `options` already `resolved`."""
        budget = options.budget(tokens.shape[1])
        if budget == tokens.shape[1]:  # the whole crop: exactly vanilla
            return tokens, grid
        return cls.select(tokens, grid, budget, options)

    @classmethod
    def select(cls, tokens: torch.Tensor, grid: tuple[int, int] | None, budget: int, options: ReductionOptions):
        """(n_crops, N, d) projected tokens on a rows x cols grid (or None), budget < N -> (the kept tokens
        (n_crops, n, d) with n <= budget, the grid they form or None)."""
        raise NotImplementedError

    @classmethod
    def kept_per_crop(cls, tokens: int, options: ReductionOptions) -> int:
        """Tokens the decoder reads of a crop of `tokens` (for the analytic cost)."""
        return options.budget(tokens)

    @classmethod
    def selection_macs(cls, shape: PrefillShape, options: ReductionOptions) -> dict[str, float]:
        """MACs of choosing the kept tokens of one sample's crops, by part (none by default)."""
        return {}

    @classmethod
    def prefill_macs(cls, shape: PrefillShape, options: ReductionOptions) -> tuple[dict[str, float], int]:
        """Vanilla's layers over the kept tokens; the connector projects every token, or the kept ones of a policy
        that `reduces_encoder_features`."""
        kept = cls.kept_per_crop(shape.vision_tokens // shape.crops, options) * shape.crops
        kept_shape = dataclasses.replace(shape, vision_tokens=kept)
        cost = LayerCost(shape.llm)
        cls.dense_layers(cost, kept_shape, shape.llm.layers, VanillaOptions())
        cost.add("connector", cls.connector_macs(kept_shape if cls.reduces_encoder_features else shape))
        for part, macs in cls.selection_macs(shape, options).items():
            cost.add(part, macs)
        return cost.macs, kept + shape.text_tokens


def token_reductions() -> dict[str, type[ReductionDecoder]]:
    """The registered token-reduction policies by name (what proxyv can run first)."""
    from leanvlm.decoders import DECODERS  # the registry imports every policy module, this one included

    return {name: policy for name, policy in DECODERS.items() if issubclass(policy, ReductionDecoder)}
