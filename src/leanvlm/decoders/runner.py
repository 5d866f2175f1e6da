"""The layer runner: drives the Hugging Face LLM's decoder layers for any decoder policy."""

from __future__ import annotations

import bisect

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from leanvlm.decoders.base import DecoderInputs, DecoderPolicy
from leanvlm.decoders.cache import DecoderCache, hidden_from
from leanvlm.decoders.llm import decoder_layers, sliding_window


class DecoderRun:
    """One forward through the decoder layers: shared state (rotary angles, key validity, masks, where keys go)
    and the loop over a range of layers. Policies with a different structure (ProxyV) run part of it themselves."""

    def __init__(
        self,
        language_model: nn.Module,
        policy: DecoderPolicy,
        inputs: DecoderInputs,
        cache: DecoderCache | None,
        gradient_checkpointing: bool,
        output_hidden_states: bool,
    ):
        self.language_model, self.policy, self.inputs, self.cache = language_model, policy, inputs, cache
        self.layers = decoder_layers(language_model)
        self.checkpointing = gradient_checkpointing and cache is None and torch.is_grad_enabled()
        self.hidden = inputs.inputs_embeds
        self.states = [self.hidden] if output_hidden_states else None
        self.num_queries = self.hidden.shape[1]
        self.cos, self.sin = language_model.model.rotary_emb(self.hidden, inputs.position_ids)
        prefix = inputs.prefix
        if prefix is not None:  # the text's dtype and device rule (an image context may come from elsewhere)
            keys = [None if k is None else k.to(self.hidden) for k in prefix.keys]
            values = [None if v is None else v.to(self.hidden) for v in prefix.values]
        if cache is not None:
            if prefix is not None:
                cache.write_prefix(prefix.valid.to(self.hidden.device), keys, values, upcoming=self.num_queries)
            cache.begin(inputs.valid)
            self.key_valid, self.prefix_len, self.kv_store = cache.key_valid, cache.prefix_len, cache.update
            self.key_until, self.hidden_from = cache.key_until, cache.hidden_from
        elif prefix is not None:
            self.key_valid = torch.cat([prefix.valid.to(self.hidden.device), inputs.valid], dim=1)
            self.prefix_len = prefix.valid.shape[1]

            def kv_store(layer_idx, key, value):
                if keys[layer_idx] is None:  # a layer without prefix keys
                    return key, value
                return torch.cat([keys[layer_idx], key], dim=2), torch.cat([values[layer_idx], value], dim=2)

            self.kv_store = kv_store
        else:
            self.key_valid, self.prefix_len = inputs.valid, 0
            self.kv_store = lambda layer_idx, key, value: (key, value)
        if cache is None:
            self.key_until, self.hidden_from = None, []
        self._masks: dict[tuple[int | None, int], object] = {}

    def key_valid_at(self, layer_idx: int) -> torch.Tensor:
        """(B, S) the keys layer `layer_idx` may read: valid and not hidden from it."""
        if self.key_until is None or not self.hidden_from or layer_idx < self.hidden_from[0]:
            return self.key_valid
        return self.key_valid & (self.key_until > layer_idx)

    def mask(self, layer_idx: int):
        """The layer's attention mask; one per sliding window and per set of hidden keys."""
        window = sliding_window(self.language_model, layer_idx)
        key = (window, bisect.bisect_right(self.hidden_from, layer_idx))
        if key not in self._masks:
            self._masks[key] = self.policy.build_mask(self.key_valid_at(layer_idx), self.num_queries,
                                                      self.prefix_len, window)
        return self._masks[key]

    def hide(self, until: torch.Tensor) -> None:
        """Let only layers < `until` (B, T) see the keys of this forward's T tokens, from the next layer run on."""
        if self.cache is not None:
            self.cache.hide(until)
            self.key_until, self.hidden_from = self.cache.key_until, self.cache.hidden_from
        else:
            layers = len(self.layers)
            earlier = self.key_valid.shape[1] - until.shape[1]  # prefix slots: seen by every layer
            self.key_until = torch.cat([until.new_full((len(until), earlier), layers), until], dim=1)
            self.hidden_from = hidden_from(self.hidden_from, until, layers)

    def run_layers(self, start: int, stop: int) -> None:
        for layer_idx in range(start, stop):
            args = (layer_idx, self.layers[layer_idx], self.hidden, self.cos, self.sin, self.mask(layer_idx),
                    self.kv_store, self.inputs)
            if self.checkpointing:
                self.hidden = checkpoint(self.policy.layer_step, *args, use_reentrant=False)
            else:
                self.hidden = self.policy.layer_step(*args)
            if self.states is not None:
                self.states.append(self.hidden)

    def finish(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        if self.cache is not None:
            self.cache.end(self.inputs.valid, self.inputs.position_ids, self.inputs.next_position)
        states = tuple(self.states) if self.states is not None else None
        return self.language_model.model.norm(self.hidden), states


def run_decoder(
    language_model: nn.Module,
    policy: DecoderPolicy,
    inputs: DecoderInputs,
    cache: DecoderCache | None = None,
    gradient_checkpointing: bool = False,
    output_hidden_states: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Run every decoder layer and the final norm: (hidden states (B, T, d), per-layer states if asked: the input
    embeddings and every layer's output, before the final norm)."""
    run = DecoderRun(language_model, policy, inputs, cache, gradient_checkpointing, output_hidden_states)
    return policy.run(run)
