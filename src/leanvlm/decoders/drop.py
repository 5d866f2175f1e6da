"""What the policies that drop vision tokens inside the language model share (`fastv`, `pyramiddrop`): vanilla's
layout, layers and parameters, with each crop's vision tokens cut down at chosen layers, ranked by the attention the
sequence's last token pays them in the layer before.

A stage is (layer, tokens kept per crop): from that layer on, a dropped token is neither a query nor a key. The
kept rows are gathered and run through the layer alone (as frozen vision layers gather theirs), the dropped tokens'
keys are hidden (`DecoderRun.hide`), and the attention kernel reads the kept keys only. The ranking is one explicit
attention row: the last token's query against the keys the layer before the stage reads, softmax per head, mean
over heads.

The key/value cache keeps a slot for every token and hides the dropped ones from the layers after their stage, so it
is as large as vanilla's and a decode step costs what vanilla's does: the saving is the prefill's, as in the papers'
own key/value-cache modes. A training sample's last token ends its whole conversation, so there the ranking reads
the answers too, as a prefill of the same text would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from leanvlm.decoders.base import DecoderInputs
from leanvlm.decoders.cost import LayerCost, PrefillShape
from leanvlm.decoders.layer import Rows, attention_update, layer_forward, project_kv, project_q, project_qkv
from leanvlm.decoders.vanilla import VanillaDecoder, VanillaInputs, VanillaOptions


@dataclass
class DropInputs(VanillaInputs):
    """Vanilla's layout, plus what the forward's stages set: the layers whose last query ranks the vision tokens
    (`rank_in`), where their rankings go ({layer: (B, S) attention over all S key slots}), and from the first stage
    on the rows the layers run on (`queries`, of this forward's T slots) and the keys they read (`keys`, of S)."""

    rank_in: frozenset[int] = frozenset()
    rankings: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    queries: Rows | None = None
    keys: Rows | None = None


class DropDecoder(VanillaDecoder):
    """A subclass sets `name`, `Options`, `presets` and `stages`. The parameters are vanilla's, under the same names:
    a trained vanilla checkpoint loads into any of these policies."""

    groups = ("connector", "image_newline")
    ranks_by_last_token = True

    def __init__(self, config, language_model: nn.Module):
        super().__init__(config, language_model)
        self.options = self.options_from(config)

    @classmethod
    def stages(cls, options, tokens: int) -> list[tuple[int, int]]:
        """(layer >= 1, tokens kept per crop) for crops of `tokens`, layers increasing and each stage keeping fewer
        tokens than the one before (a stage that would drop nothing is left out)."""
        raise NotImplementedError

    @classmethod
    def prefill_macs(cls, shape: PrefillShape, options) -> tuple[dict[str, float], int]:
        """Vanilla's layers, each stage's over the tokens it keeps, and per stage the ranking row: the last token's
        query against every key the layer before reads."""
        llm, m = shape.llm, shape.text_tokens
        cost = LayerCost(llm)
        start, kept = 0, shape.vision_tokens
        for layer, per_crop in cls.stages(options, shape.vision_tokens // shape.crops):
            cls.dense_layers(cost, dataclasses.replace(shape, vision_tokens=kept), layer - start, VanillaOptions())
            cost.add("ranking", (kept + m) * llm.q_width)
            start, kept = layer, per_crop * shape.crops
        cls.dense_layers(cost, dataclasses.replace(shape, vision_tokens=kept), llm.layers - start, VanillaOptions())
        cost.add("connector", cls.connector_macs(shape))
        return cost.macs, shape.vision_tokens + m

    def build_inputs(self, *args, **kwargs) -> DecoderInputs:
        inputs = super().build_inputs(*args, **kwargs)
        return DropInputs(**{field.name: getattr(inputs, field.name) for field in dataclasses.fields(inputs)})

    def run(self, run):
        inputs, layers = run.inputs, len(run.layers)
        vision = inputs.vision_mask
        crops = sum(sum(counts) for counts in inputs.image_crops or [])
        stages = self.stages(self.options, int(vision.sum()) // crops) if crops and vision is not None else []
        if stages:
            run.inputs = inputs = dataclasses.replace(inputs, rank_in=frozenset(layer - 1 for layer, _ in stages))
        start, kept = 0, vision
        until = None  # (B, T): the layers that see each token's keys
        for layer, per_crop in stages:
            run.run_layers(start, layer)
            ranking = inputs.rankings.pop(layer - 1)[:, -vision.shape[1]:]  # this forward's slots
            chosen = self.keep_best(ranking, kept, crops, per_crop)
            if until is None:
                until = torch.full(vision.shape, layers, dtype=torch.int16, device=vision.device)
            until[kept & ~chosen] = layer
            run.hide(until)
            kept = chosen
            run.inputs = inputs = dataclasses.replace(
                inputs, queries=Rows.where(inputs.valid & (~vision | kept)), keys=Rows.where(run.key_valid_at(layer)))
            start = layer
        run.run_layers(start, layers)
        return run.finish()

    @staticmethod
    def keep_best(ranking: torch.Tensor, kept: torch.Tensor, crops: int, per_crop: int) -> torch.Tensor:
        """The `per_crop` best-ranked of each crop's kept tokens: `ranking` and `kept` are (B, T), the kept slots
        row by row are `crops` crops of equally many tokens -> the chosen ones as a (B, T) mask."""
        slots = kept.nonzero(as_tuple=True)  # row-major: crop after crop
        scores = ranking[slots].view(crops, -1)  # (C, tokens kept so far)
        best = scores.topk(per_crop, dim=1).indices
        chosen = torch.zeros_like(kept)
        chosen[slots] = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, best, True).flatten()
        return chosen

    def layer_step(self, layer_idx, layer, hidden, cos, sin, mask, kv_store, inputs: DecoderInputs):
        ranks = isinstance(inputs, DropInputs) and layer_idx in inputs.rank_in
        rows = inputs.queries if isinstance(inputs, DropInputs) else None
        if rows is None and not ranks:  # no stage yet (or a decode step, hidden slots masked): vanilla's layer
            return layer_forward(layer, hidden, cos, sin, mask, kv_store, layer_idx)
        if rows is None:  # the layer before the first stage: every row, and the ranking row
            query, key, value = project_qkv(layer, layer.input_layernorm(hidden), cos, sin)
            key, value = kv_store(layer_idx, key, value)
            last_row = _last_mask_row(mask, key)
            inputs.rankings[layer_idx] = self.ranking(layer, query[:, :, -1:], key, last_row).detach()
            hidden = hidden + attention_update(layer, query, key, value, mask)
            return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        keys, length = inputs.keys, hidden.shape[1]
        normed = layer.input_layernorm(rows.take(hidden))  # (B, R, d): the kept rows only
        rows_cos, rows_sin = rows.take(cos), rows.take(sin)
        query = project_q(layer, normed, rows_cos, rows_sin)  # (B, H, R, D)
        key, value = project_kv(layer, normed, rows_cos, rows_sin)  # (B, H_kv, R, D)
        # every slot of the block goes to the cache (a dropped one as zeros, hidden), then the readable keys return
        key, value = kv_store(layer_idx, _at_slots(rows, key, length), _at_slots(rows, value, length))
        slots = key.shape[2]
        key, value = _take_slots(keys, key), _take_slots(keys, value)  # (B, H_kv, K, D)
        row_mask = _rows_and_keys(mask, rows, keys, slots)  # (B, 1, R, K)
        if ranks:
            last = (rows.present.sum(dim=1) - 1)[:, None, None, None]  # each sample's last row: its last token
            last_query = query.gather(2, last.expand(-1, query.shape[1], 1, query.shape[3]))
            ranking = self.ranking(layer, last_query, key, row_mask.gather(2, last.expand(-1, 1, 1, key.shape[2])))
            ranking = torch.where(keys.present, ranking, 0)
            inputs.rankings[layer_idx] = ranking.new_zeros(len(ranking), slots).scatter(1, keys.index, ranking).detach()
        out = rows.take(hidden) + attention_update(layer, query, key, value, row_mask)
        out = out + layer.mlp(layer.post_attention_layernorm(out))
        return rows.put(hidden, out)

    @staticmethod
    def ranking(layer: nn.Module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The attention of one query per sample (B, H, 1, D) over key (B, H_kv, K, D) where a (B, 1, 1, K) mask
        allows: softmax per head, then the mean over heads -> (B, K)."""
        groups = query.shape[1] // key.shape[1]
        logits = query.unflatten(1, (key.shape[1], groups)) @ key[:, :, None].transpose(-1, -2)  # (B, H_kv, G, 1, K)
        logits = logits.flatten(1, 2).float() * layer.self_attn.scaling  # (B, H, 1, K)
        return logits.masked_fill(~mask, float("-inf")).softmax(dim=-1).mean(dim=1)[:, 0]


def _last_mask_row(mask, key: torch.Tensor) -> torch.Tensor:
    """The last query's row of a layer's mask (B, 1, 1, K); with the plain causal mask or none it sees every key."""
    if isinstance(mask, torch.Tensor):
        return mask[:, :, -1:]
    return torch.ones(key.shape[0], 1, 1, key.shape[2], dtype=torch.bool, device=key.device)


def _at_slots(rows: Rows, x: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, R, D) of the gathered rows -> (B, H, T, D) with those rows in their slots and zeros elsewhere."""
    batch, heads, _, dim = x.shape
    flat = rows.put(x.new_zeros(batch, length, heads * dim), x.transpose(1, 2).flatten(2))
    return flat.view(batch, length, heads, dim).transpose(1, 2)


def _take_slots(keys: Rows, x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> the slots `keys` picks, (B, H, K, D)."""
    batch, heads, _, dim = x.shape
    return keys.take(x.transpose(1, 2).flatten(2)).view(batch, -1, heads, dim).transpose(1, 2)


def _rows_and_keys(mask, rows: Rows, keys: Rows, slots: int) -> torch.Tensor:
    """A layer's mask over (T queries, S key slots) -> (B, 1, R, K) for the gathered rows and keys; filler keys are
    hidden, and a filler query row that would see no key sees every key (its output is never used)."""
    picked = rows.of_mask(mask, slots)  # (B, 1, R, S), or None: every key
    if picked is None:
        picked = torch.ones(rows.index.shape[0], 1, rows.index.shape[1], slots, dtype=torch.bool,
                            device=rows.index.device)
    picked = picked.gather(3, keys.index[:, None, None, :].expand(-1, 1, picked.shape[2], -1))
    picked = picked & keys.present[:, None, None, :]
    return picked | ~picked.any(dim=-1, keepdim=True)
