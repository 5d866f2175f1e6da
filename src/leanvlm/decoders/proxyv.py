"""`proxyv` (ProxyV, arXiv 2505.15816): vanilla up to layer s; from s on, a few proxy vision tokens per crop do the
heavy work (queries + FFN with the LLM's own weights) and the full vision tokens only supply keys/values and get a
light per-layer guided update from the proxy that covers them.

Layers >= s see three blocks, `[full vision F | proxies P | rest X]` (X = text and newlines, in sequence order):
queries come from [P; X], keys/values from all three. With logical positions (proxies reuse the first positions of
their image), a query sees keys at or before its position, except that proxies never see full tokens and text never
sees proxies. After the prefill the proxies are dropped: the cache holds [full; newline; text] keys in every layer
and decoding uses plain layers.

With `proxyv_token_reduction`, a registered token reduction (its own selection code) first cuts each crop's projected
tokens, and all of the above runs over the kept ones: spatial proxies down-sample the pooled grid, learned proxies
softly assign whatever tokens are left.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init

from leanvlm.decoders.base import DecoderInputs, PolicyOptions, Preset, left_pad
from leanvlm.decoders.cost import LayerCost, PrefillShape, causal_pairs
from leanvlm.decoders.layer import attention_update, project_qkv
from leanvlm.decoders.llm import decoder_layers, sliding_window
from leanvlm.decoders.reduction import ReductionDecoder, token_reductions
from leanvlm.decoders.vanilla import VanillaDecoder, VanillaOptions

FULL, PROXY, REST = 0, 1, 2  # token kinds in the mask builder


def proxyv_inner_width(hidden: int, width: int | None = None) -> int:
    """Width d' of ProxyV's guided-update MLPs: `width` if set, else d/4 for d >= 1024 and d/2 below."""
    return width or (hidden // 4 if hidden >= 1024 else hidden // 2)


class VisionMLP(nn.Module):
    """Guided update of the full vision tokens after one layer: RMSNorm(W2 SiLU(W1 [Win f ; g]) + f), where g is the
    projection (Wc) of the proxy covering the token. All Linear layers without bias."""

    def __init__(self, width: int, inner: int, norm: nn.Module):
        super().__init__()
        self.input_proj = nn.Linear(width, inner, bias=False)  # Win
        self.proxy_proj = nn.Linear(width, inner, bias=False)  # Wc, applied to proxies before spreading
        self.fc1 = nn.Linear(2 * inner, inner, bias=False)
        self.fc2 = nn.Linear(inner, width, bias=False)
        self.norm = norm

    def forward(self, full: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        update = self.fc2(F.silu(self.fc1(torch.cat([self.input_proj(full), guide], dim=-1))))
        return self.norm(update + full)


class ProxyInitializer(nn.Module):
    """Non-spatial proxies: learnable queries attend over one crop's tokens (proxies = softmax over tokens of
    Q (X Wk)^T / sqrt(d') times the raw states X); the transposed softmax (over proxies) assigns each token to the
    proxies for the guided update."""

    def __init__(self, width: int, inner: int, num_proxies: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_proxies, inner) * (4 * inner) ** -0.5)
        self.key_proj = nn.Linear(width, inner, bias=False)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """crops (K, N, d) -> proxies (K, n, d), assignment (K, N, n) whose rows sum to 1."""
        logits = self.queries @ self.key_proj(crops).transpose(1, 2) * self.queries.shape[1] ** -0.5  # (K, n, N)
        return logits.softmax(dim=-1) @ crops, logits.transpose(1, 2).softmax(dim=-1)


def proxy_grid(grid: tuple[int, int], factor: int) -> tuple[int, int]:
    """The proxies' grid: each side divided by `factor`, rounded down, at least 1 (27x27 SigLIP / 4 -> 6x6)."""
    return max(1, grid[0] // factor), max(1, grid[1] // factor)


def proxies_per_crop(tokens: int, factor: int) -> int:
    """Proxies of a crop of `tokens` for the analytic cost: `proxy_grid` of their square grid, or for a count that is
    no square, an estimate."""
    side = math.isqrt(tokens)
    if side * side == tokens:
        rows, cols = proxy_grid((side, side), factor)
        return rows * cols
    return max(1, tokens // factor**2)


def spatial_proxies(crops: torch.Tensor, grid: tuple[int, int], factor: int) -> torch.Tensor:
    """crops (K, N, d) on a rows x cols grid -> (K, n, d): bilinear down-sampling to `proxy_grid`
    (align_corners=False, no antialias), raster order."""
    rows, cols = grid
    images = crops.view(crops.shape[0], rows, cols, -1).permute(0, 3, 1, 2)
    small = F.interpolate(images, size=proxy_grid(grid, factor), mode="bilinear", align_corners=False)
    return small.flatten(2).transpose(1, 2)


def covering_proxy(grid: tuple[int, int], factor: int, num_crops: int, device) -> torch.Tensor:
    """For every full token of `num_crops` consecutive crops, the index of the proxy that covers it: nearest
    up-sampling of the proxy grid (token row i -> proxy row i * proxy_rows // rows; i // factor on divisible grids)."""
    rows, cols = grid
    small_rows, small_cols = proxy_grid(grid, factor)
    r = torch.arange(rows, device=device)[:, None] * small_rows // rows
    c = torch.arange(cols, device=device)[None, :] * small_cols // cols
    within = (r * small_cols + c).flatten()
    per_crop = small_rows * small_cols
    return (torch.arange(num_crops, device=device)[:, None] * per_crop + within[None]).flatten()


def build_proxy_mask(
    query_pos, query_kind, key_pos, key_kind, key_valid, window: int | None = None
) -> torch.Tensor:
    """(B, 1, Q, K) bool: a query sees valid keys at or before its logical position (and inside the window), except
    proxies never see full tokens and non-proxy queries never see proxies. Rows with nothing visible (padding
    queries) see everything, which keeps SDPA finite; their outputs are never used."""
    q_pos, k_pos = query_pos[:, :, None], key_pos[:, None, :]
    visible = (k_pos <= q_pos) & key_valid[:, None, :]
    if window is not None:
        visible &= (q_pos - k_pos) < window
    q_kind, k_kind = query_kind[:, :, None], key_kind[:, None, :]
    visible &= ~((q_kind == PROXY) & (k_kind == FULL))
    visible &= ~((q_kind != PROXY) & (k_kind == PROXY))
    visible |= ~visible.any(dim=-1, keepdim=True)
    return visible[:, None]


@dataclass
class ProxyVOptions(PolicyOptions):
    """From decoder layer `proxyv_start_layer` (None = the middle layer) on, proxy tokens (each crop's grid reduced
    `proxyv_reduce_factor` times per side) replace the full vision tokens as queries and in the FFN; the full tokens
    get a per-layer guided update MLP of width `proxyv_mlp_width` (None = d/4 if d >= 1024 else d/2). Proxies are
    "spatial" (bilinear down-sampling) or "learned" (learnable queries).

    `proxyv_token_reduction` names a token-reduction policy ("random", "pool", "divprune", "visionzip") that first
    cuts each crop's tokens to its budget, set with that policy's own options (`keep_tokens` or `keep_ratio`,
    random's `random_seed`, visionzip's `visionzip_contextual`); ProxyV then runs over the kept tokens. None
    keeps every token, and the budget options must then stay unset."""

    proxyv_start_layer: int | None = None
    proxyv_reduce_factor: int = 4
    proxyv_proxy_init: str = "spatial"
    proxyv_mlp_width: int | None = None
    proxyv_token_reduction: str | None = None
    keep_tokens: int = 64
    keep_ratio: float | None = None
    random_seed: int = 0
    visionzip_contextual: int | None = None

    def resolved(self, num_layers: int) -> ProxyVOptions:
        start = num_layers // 2 if self.proxyv_start_layer is None else self.proxyv_start_layer
        if not 0 <= start <= num_layers:
            raise ValueError(f"proxyv_start_layer={start} must be in 0..{num_layers} (the number of layers).")
        if self.proxyv_reduce_factor < 1:
            raise ValueError(f"proxyv_reduce_factor must be >= 1, got {self.proxyv_reduce_factor}.")
        if self.proxyv_proxy_init not in ("spatial", "learned"):
            raise ValueError(f"proxyv_proxy_init={self.proxyv_proxy_init!r} is not 'spatial' or 'learned'.")
        if self.proxyv_mlp_width is not None and self.proxyv_mlp_width < 1:
            raise ValueError(f"proxyv_mlp_width must be >= 1 (or None for the default), got {self.proxyv_mlp_width}.")
        if self.proxyv_token_reduction is not None:
            reductions = token_reductions()
            if self.proxyv_token_reduction not in reductions:
                raise ValueError(f"proxyv_token_reduction={self.proxyv_token_reduction!r} is not one of "
                                 f"{', '.join(map(repr, reductions))} (or None for every token).")
            reduction = reductions[self.proxyv_token_reduction]
            reduction.options_from(self).resolved(num_layers)  # the budget, checked as the reduction checks it
            if self.proxyv_proxy_init == "spatial" and not reduction.keeps_patch_grid:
                raise ValueError(
                    f"proxyv_token_reduction={self.proxyv_token_reduction!r} keeps a set of tokens that forms no "
                    "patch grid, which spatial proxies down-sample; use proxyv_proxy_init='learned', or "
                    "proxyv_token_reduction='pool', which keeps a (smaller) grid."
                )
        return dataclasses.replace(self, proxyv_start_layer=start)

    def refuse_unread(self) -> None:
        takes = {name: {f.name for f in dataclasses.fields(policy.Options)}
                 for name, policy in token_reductions().items()}
        unread = [name for name in self.changed()
                  if name in set().union(*takes.values()) - takes.get(self.proxyv_token_reduction, set())]
        if unread:
            readers = [repr(name) for name, options in takes.items() if set(unread) <= options]
            raise ValueError(
                f"{', '.join(unread)}: {'an option' if len(unread) == 1 else 'options'} of proxyv_token_reduction="
                f"{' or '.join(readers)}, but it is {self.proxyv_token_reduction!r}; set it to one of those or leave "
                f"{'it' if len(unread) == 1 else 'them'} unset."
            )

    @property
    def reduction(self) -> type[ReductionDecoder] | None:
        """The token-reduction policy that runs first, or None."""
        return None if self.proxyv_token_reduction is None else token_reductions()[self.proxyv_token_reduction]


class ProxyVDecoder(VanillaDecoder):
    name = "proxyv"
    Options = ProxyVOptions
    options_are = "proxyv options"
    groups = ("connector", "image_newline", "vision_mlps", "proxy_init")
    needs_patch_grid = True  # spatial proxies pool the grid; learned ones are sized for it
    # Tiny test models (4x4 patch grids, 3 layers): start at the middle layer, 1 proxy per crop.
    presets: ClassVar[dict[str, Preset]] = {
        "learned_proxies": Preset({"proxyv_proxy_init": "learned"}),
        "pool_4": Preset({"proxyv_token_reduction": "pool", "keep_tokens": 4}),  # spatial proxies of a 2x2 grid
        "divprune_5": Preset({"proxyv_token_reduction": "divprune", "keep_tokens": 5, "proxyv_proxy_init": "learned"}),
        "visionzip_6": Preset({"proxyv_token_reduction": "visionzip", "keep_tokens": 6,
                               "proxyv_proxy_init": "learned"}),
    }

    def __init__(self, config, language_model: nn.Module):
        super().__init__(config, language_model)
        width = config.text_config.hidden_size
        layers = decoder_layers(language_model)
        self.start_layer = config.proxyv_start_layer
        self.factor = config.proxyv_reduce_factor
        inner = proxyv_inner_width(width, config.proxyv_mlp_width)
        norm_class = type(layers[0].input_layernorm)
        eps = config.text_config.rms_norm_eps
        self.vision_mlps = nn.ModuleList(
            VisionMLP(width, inner, norm_class(width, eps=eps)) for _ in range(self.start_layer, len(layers))
        )
        options = self.options_from(config)
        self.reduction = options.reduction
        self.reduction_options = None if self.reduction is None else self.reduction.options_from(config)
        self.proxy_init = None
        if config.proxyv_proxy_init == "learned":
            side = config.vision_config.image_size // config.vision_config.patch_size
            self.learned_tokens_per_crop = side * side
            rows, cols = proxy_grid((side, side), self.factor)
            # sized by the encoder's grid; the soft assignment takes any number of tokens, e.g. the kept ones
            self.proxy_init = ProxyInitializer(width, inner, rows * cols)
            kept = None if self.reduction is None else self.reduction.kept_per_crop(side * side, self.reduction_options)
            if kept is not None and kept < rows * cols:  # the extra proxies would take the positions of later text
                raise ValueError(
                    f"proxyv_token_reduction={options.proxyv_token_reduction!r} keeps {kept} tokens per crop, fewer "
                    f"than the {rows * cols} learned proxies of the encoder's {side}x{side} grid; keep more tokens "
                    "or raise proxyv_reduce_factor."
                )

    def init_module(self, module: nn.Module) -> None:
        if module is self.proxy_init:
            init.normal_(module.queries, std=(4 * module.queries.shape[1]) ** -0.5)
        else:
            super().init_module(module)

    @classmethod
    def prefill_macs(cls, shape: PrefillShape, options: ProxyVOptions) -> tuple[dict[str, float], int]:
        """Vanilla's layers up to s and ProxyV's from s on, over the kept tokens; the connector projects every token
        (the kept ones after a reduction of the encoder's features), and a token reduction adds what choosing the
        kept tokens costs."""
        reduction, kept, selection = options.reduction, shape, {}
        if reduction is not None:
            budget = reduction.options_from(options)
            kept = dataclasses.replace(
                shape, vision_tokens=reduction.kept_per_crop(shape.vision_tokens // shape.crops, budget) * shape.crops
            )
            selection = reduction.selection_macs(shape, budget)
        llm, n, m, crops = shape.llm, kept.vision_tokens, shape.text_tokens, shape.crops
        d, layers = llm.hidden, llm.layers
        start = options.proxyv_start_layer
        cost = LayerCost(llm)
        cls.dense_layers(cost, kept, start, VanillaOptions())
        if start < layers:
            # spatial proxies down-sample the kept grid; learned ones are as many as the encoder's whole grid gives
            sized_for = shape if options.proxyv_proxy_init == "learned" else kept
            per_crop = proxies_per_crop(sized_for.vision_tokens // crops, options.proxyv_reduce_factor)
            proxies = per_crop * crops
            inner = proxyv_inner_width(d, options.proxyv_mlp_width)
            q, k = proxies + m, n + proxies + m
            pairs = q * k if shape.full_attention else causal_pairs(proxies) + m * n + causal_pairs(m)
            for _ in range(start, layers):
                cost.layer(q, k, pairs)
            per_layer = n * (d * inner + 2 * inner * inner + inner * d) + proxies * d * inner
            cost.add("vision_mlps", (layers - start) * per_layer)
            if options.proxyv_proxy_init == "learned":
                cost.add("vision_mlps", (layers - start) * n * per_crop * inner)  # spreading the guide
                cost.add("proxy_init", n * d * inner + proxies * (n // crops) * (inner + d))  # keys, logits, pooling
        cost.add("connector", cls.connector_macs(kept if reduction and reduction.reduces_encoder_features else shape))
        for part, macs in selection.items():
            cost.add(part, macs)
        return cost.macs, n + m

    @classmethod
    def feature_keys(cls, config) -> list:
        reduction = cls.options_from(config).reduction
        return cls.feature_layers(config) if reduction is None else reduction.feature_keys(config)

    def project_images(self, features: dict) -> torch.Tensor:
        hidden = features[self.feature_layer]  # (n_crops, N, d_v)
        if self.proxy_init is not None and hidden.shape[1] != self.learned_tokens_per_crop:
            raise ValueError(
                f"The learned proxies were built for {self.learned_tokens_per_crop} tokens per crop (the encoder's "
                f"image_size / patch_size squared) but the crops have {hidden.shape[1]}; feed images at the "
                "encoder's configured size."
            )
        if self.reduction is not None:
            hidden = self.reduction.features_to_project(features, self.feature_layer, self.reduction_options)
        return self.connector(hidden)

    def reduce_tokens(self, tokens: torch.Tensor, grid: tuple[int, int] | None):
        if self.reduction is None:
            return tokens, grid
        return self.reduction.reduce(tokens, grid, self.reduction_options)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().parameter_groups()
        groups["vision_mlps"] = list(self.vision_mlps.parameters())
        if self.proxy_init is not None:
            groups["proxy_init"] = list(self.proxy_init.parameters())
        return groups

    def run(self, run):
        cache = run.cache
        inputs = run.inputs
        has_vision = inputs.vision_mask is not None and bool(inputs.vision_mask.any())
        if self.start_layer >= len(run.layers) or not has_vision or (cache is not None and cache.length):
            return super().run(run)  # decode steps and continuations use plain layers
        run.run_layers(0, self.start_layer)
        self._proxy_layers(run)
        return run.finish()

    # ------------------------------------------------------------------ layers >= s
    # Shapes: B samples, T sequence slots, K crops (of the sample with most), N tokens and n proxies per crop,
    # F = K * N full vision rows, P = K * n proxy rows, X rest rows (text and newlines), d width, d' MLP width.
    def _proxy_layers(self, run) -> None:
        """Layers s.. over the blocks [F | P | X]; `run.hidden` ends in sequence order again."""
        inputs, hidden = run.inputs, run.hidden  # hidden (B, T, d)
        vision_index, vision_valid, rest_index, rest_valid, per_crop = self._blocks(inputs)  # (B, F), (B, X)
        full, rest = _gather(hidden, vision_index), _gather(hidden, rest_index)  # (B, F, d), (B, X, d)
        proxies, assignment, cover = self._proxies(inputs, full, per_crop)  # (B, P, d)
        key_pos, key_kind, key_valid = self._key_layout(
            inputs, vision_index, vision_valid, rest_index, rest_valid, per_crop, proxies.shape[1]
        )  # each (B, F + P + X)
        cos, sin = run.language_model.model.rotary_emb(hidden, key_pos)  # (B, F + P + X, head_dim)
        main_order = self._main_order(inputs, vision_index, vision_valid, rest_index, rest_valid, proxies.shape[1])
        layer_step = functools.partial(self._layer, run=run, cos=cos, sin=sin, main_order=main_order,
                                       assignment=assignment, cover=cover)
        num_full = full.shape[1]
        masks = {}  # one per sliding window in use
        for layer_idx in range(self.start_layer, len(run.layers)):
            window = sliding_window(run.language_model, layer_idx)
            if window not in masks:  # (B, 1, P + X, F + P + X): queries are the rows after F
                masks[window] = build_proxy_mask(
                    key_pos[:, num_full:], key_kind[:, num_full:], key_pos, key_kind, key_valid, window
                )
            args = (layer_idx, full, proxies, rest, masks[window])
            if run.checkpointing:
                full, proxies, rest = checkpoint(layer_step, *args, use_reentrant=False)
            else:
                full, proxies, rest = layer_step(*args)
            if run.states is not None:
                run.states.append(_gather(torch.cat([full, proxies, rest], dim=1), main_order))
        run.hidden = _gather(torch.cat([full, proxies, rest], dim=1), main_order)  # (B, T, d)

    def _proxies(self, inputs: DecoderInputs, full: torch.Tensor, per_crop: int):
        """full (B, F, d) -> proxies (B, P, d) and how they guide the full tokens: learned proxies give `assignment`
        (B * K, N, n), spatial ones `cover` (F,), the proxy row covering each full row."""
        batch = full.shape[0]
        crops = full.view(-1, per_crop, full.shape[-1])  # (B * K, N, d)
        if self.proxy_init is not None:
            proxies, assignment = self.proxy_init(crops)  # (B * K, n, d), (B * K, N, n)
            cover = None
        else:
            grid = self._checked_grid(inputs)
            proxies, assignment = spatial_proxies(crops, grid, self.factor), None  # (B * K, n, d)
            cover = covering_proxy(grid, self.factor, crops.shape[0] // batch, full.device)
        return proxies.reshape(batch, -1, proxies.shape[-1]), assignment, cover

    def _key_layout(self, inputs, vision_index, vision_valid, rest_index, rest_valid, per_crop: int,
                    num_proxies: int):
        """Logical position, kind (FULL, PROXY, REST) and validity of every row of [F | P | X], each (B, F + P + X)."""
        batch, num_crops = vision_index.shape[0], vision_index.shape[1] // per_crop
        positions = inputs.position_ids  # (B, T)
        full_pos, rest_pos = _gather(positions, vision_index), _gather(positions, rest_index)  # (B, F), (B, X)
        proxy_pos = self._proxy_positions(inputs, full_pos, per_crop, num_proxies // num_crops, num_crops)  # (B, P)
        crop_valid = vision_valid.view(batch, num_crops, per_crop)[:, :, 0]  # (B, K): a crop is valid or padding
        proxy_valid = crop_valid.repeat_interleave(num_proxies // num_crops, dim=1)  # (B, P)
        key_pos = torch.cat([full_pos, proxy_pos, rest_pos], dim=1)
        key_kind = torch.cat([
            torch.full_like(full_pos, FULL), torch.full_like(proxy_pos, PROXY), torch.full_like(rest_pos, REST)
        ], dim=1)
        key_valid = torch.cat([vision_valid, proxy_valid, rest_valid], dim=1)
        return key_pos, key_kind, key_valid

    def _layer(self, layer_idx, full, proxies, rest, mask, run, cos, sin, main_order, assignment, cover):
        """One layer >= s: full (B, F, d), proxies (B, P, d), rest (B, X, d) -> the three updated."""
        layer = run.layers[layer_idx]
        num_full = full.shape[1]
        tokens = torch.cat([full, proxies, rest], dim=1)  # (B, F + P + X, d)
        # query (B, H, P + X, head_dim); key, value (B, H_kv, F + P + X, head_dim)
        query, key, value = project_qkv(layer, layer.input_layernorm(tokens), cos, sin, query_from=num_full)
        if run.cache is not None:  # cache [full; newline; text] in sequence order; proxies are prefill-only
            index = main_order[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])  # (B, H_kv, T, head_dim)
            run.cache.update(layer_idx, key.gather(2, index), value.gather(2, index))
        working = tokens[:, num_full:]  # (B, P + X, d): the rows that query and go through the FFN
        working = working + attention_update(layer, query, key, value, mask)
        working = working + layer.mlp(layer.post_attention_layernorm(working))
        new_proxies, new_rest = working.split([proxies.shape[1], rest.shape[1]], dim=1)

        vision_mlp = self.vision_mlps[layer_idx - self.start_layer]
        guide = vision_mlp.proxy_proj(new_proxies)  # (B, P, d')
        if assignment is None:
            guide = guide[:, cover]  # (B, F, d'): each full row gets its covering proxy's guide
        else:
            crops = assignment.shape[0] // full.shape[0]
            # (B * K, N, n) @ (B * K, n, d') -> (B * K, N, d') -> (B, F, d')
            guide = (assignment @ guide.view(assignment.shape[0], -1, guide.shape[-1])).view(
                full.shape[0], crops * assignment.shape[1], -1
            )
        return vision_mlp(full, guide), new_proxies, new_rest  # (B, F, d), (B, P, d), (B, X, d)

    # ------------------------------------------------------------------ bookkeeping (prefill only)
    def _checked_grid(self, inputs: DecoderInputs) -> tuple[int, int]:
        grid = inputs.vision_grid
        if grid is None:
            raise ValueError(
                "Spatial proxies need each crop's tokens to form the encoder's patch grid, and this image context "
                "has none: encode images with vision_feature_select='patch' (no CLS token), give a hand-built "
                "ImageContext its grid=(rows, cols), or use proxyv_proxy_init='learned'."
            )
        return grid

    @staticmethod
    def _blocks(inputs: DecoderInputs):
        """Indices (into the sequence) of each sample's full vision tokens, padded at the end to whole crops of the
        batch's largest crop count, and of its other valid tokens, left-padded; and the tokens per crop. Returns
        vision_index, vision_valid (B, F) and rest_index, rest_valid (B, X), then N."""
        per_crop = None
        vision_rows, rest_rows = [], []
        for b in range(inputs.vision_mask.shape[0]):
            vision_rows.append(inputs.vision_mask[b].nonzero().flatten())  # (F_b,)
            rest_rows.append((inputs.valid[b] & ~inputs.vision_mask[b]).nonzero().flatten())  # (X_b,)
            crops = sum(inputs.image_crops[b])
            if crops:
                per_crop = len(vision_rows[-1]) // crops
        longest = max(len(row) for row in vision_rows)
        vision_index = torch.zeros(len(vision_rows), longest, dtype=torch.long, device=inputs.valid.device)  # (B, F)
        vision_valid = torch.zeros_like(vision_index, dtype=torch.bool)
        for b, row in enumerate(vision_rows):
            vision_index[b, : len(row)] = row
            vision_valid[b, : len(row)] = True
        rest_index, rest_valid = left_pad(rest_rows, 0)
        return vision_index, vision_valid, rest_index, rest_valid, per_crop

    @staticmethod
    def _proxy_positions(inputs, full_pos, per_crop: int, per_crop_proxies: int, num_crops: int) -> torch.Tensor:
        """Proxies of an image take its first logical positions: o, o + 1, ... across all its crops."""
        proxy_pos = torch.zeros(full_pos.shape[0], num_crops * per_crop_proxies, dtype=torch.long,
                                device=full_pos.device)
        for b, image_crops in enumerate(inputs.image_crops):
            crop = 0
            for count in image_crops:
                start = full_pos[b, crop * per_crop]
                slots = slice(crop * per_crop_proxies, (crop + count) * per_crop_proxies)
                proxy_pos[b, slots] = start + torch.arange(count * per_crop_proxies, device=full_pos.device)
                crop += count
        return proxy_pos

    @staticmethod
    def _main_order(inputs, vision_index, vision_valid, rest_index, rest_valid, num_proxies) -> torch.Tensor:
        """For each sequence slot, its row in [F | P | X] (padding slots point at row 0; they are masked): (B, T)."""
        order = torch.zeros_like(inputs.position_ids)  # (B, T)
        samples = torch.arange(order.shape[0], device=order.device)[:, None]  # (B, 1)
        full_rows = torch.arange(vision_index.shape[1], device=order.device).expand_as(vision_index)  # (B, F): 0..F-1
        order[samples.expand_as(vision_index)[vision_valid], vision_index[vision_valid]] = full_rows[vision_valid]
        offset = vision_index.shape[1] + num_proxies  # X rows start after F and P
        rest_rows = offset + torch.arange(rest_index.shape[1], device=order.device).expand_as(rest_index)  # (B, X)
        order[samples.expand_as(rest_index)[rest_valid], rest_index[rest_valid]] = rest_rows[rest_valid]
        return order


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B, T, ...) gathered along dim 1 with index (B, S)."""
    if tensor.ndim == 2:
        return tensor.gather(1, index)
    return tensor.gather(1, index[..., None].expand(-1, -1, tensor.shape[-1]))
