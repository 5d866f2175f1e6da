"""Key/value cache for generation: one preallocated buffer per layer, written in place.

Slots hold `[prefix | text]` keys in time order, the same layout the mask builder expects; the prefix (HiMix's vision
keys) is written once at prefill. Samples of a batch are left-aligned to the same slot count, padding slots are
marked invalid in `key_valid`.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, reserve: int = 0):
        self.num_layers = num_layers
        self.reserve = reserve  # extra slots to allocate at first write (e.g. max_new_tokens)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_valid: torch.Tensor | None = None  # (B, length) bool
        self.prefix_len = 0
        self.length = 0  # filled slots
        self.next_position: torch.Tensor | None = None  # (B,) next text position per sample
        self._start = 0  # first slot of the block being written

    @property
    def text_length(self) -> int:
        return self.length - self.prefix_len

    def begin(self, valid: torch.Tensor) -> None:
        """Open a block of `valid.shape[1]` new slots; every layer then writes it with `update`."""
        self._start = self.length
        self.key_valid = valid if self.key_valid is None else torch.cat([self.key_valid, valid], dim=1)

    def end(self) -> None:
        self.length = self.key_valid.shape[1]

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write key/value (B, H_kv, T, D) into the open block; return all keys/values so far (views)."""
        stop = self._start + key.shape[2]
        buf_k, buf_v = self.keys[layer_idx], self.values[layer_idx]
        if buf_k is None or buf_k.shape[2] < stop:
            buf_k, buf_v = self._grow(buf_k, key, stop), self._grow(buf_v, value, stop)
            self.keys[layer_idx], self.values[layer_idx] = buf_k, buf_v
        buf_k[:, :, self._start : stop] = key
        buf_v[:, :, self._start : stop] = value
        return buf_k[:, :, :stop], buf_v[:, :, :stop]

    def write_prefix(self, valid: torch.Tensor, layer_kv) -> None:
        """Store position-free prefix keys (B, P) in front of any text: `layer_kv` yields (key, value) per layer."""
        if self.length:
            raise RuntimeError("the prefix must be written before any text")
        self.begin(valid)
        for layer_idx, (key, value) in enumerate(layer_kv):
            self.update(layer_idx, key, value)
        self.end()
        self.prefix_len = self.length

    def _grow(self, buf: torch.Tensor | None, like: torch.Tensor, needed: int) -> torch.Tensor:
        capacity = needed + self.reserve
        new = like.new_zeros(like.shape[0], like.shape[1], capacity, like.shape[3])
        if buf is not None:
            new[:, :, : self._start] = buf[:, :, : self._start]
        return new

    def nbytes(self) -> int:
        """Bytes of the filled key/value slots over all layers."""
        total = 0
        for buf in self.keys + self.values:
            if buf is not None:
                total += buf[:, :, : self.length].numel() * buf.element_size()
        return total
