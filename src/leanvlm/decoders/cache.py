"""Key/value cache for generation: one preallocated buffer per layer, written in place.

Slots hold `[prefix | text]` keys in time order, the same layout the mask builder expects; the prefix (HiMix's vision
keys) is written once at prefill. Samples of a batch are left-aligned to the same slot count, padding slots are
marked invalid in `key_valid`.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, reserve: int = 0):
        self.reserve = reserve  # extra slots to allocate with the first block (e.g. max_new_tokens)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_valid: torch.Tensor | None = None  # (B, length) bool
        self.prefix_len = 0
        self.length = 0  # filled slots
        self.next_position: torch.Tensor | None = None  # (B,) next text position per sample
        self._start = 0  # first slot of the block being written
        self._upcoming = 0  # slots known to follow the open block (text after a prefix)

    @property
    def batch_size(self) -> int | None:
        return None if self.key_valid is None else self.key_valid.shape[0]

    def begin(self, valid: torch.Tensor, upcoming: int = 0) -> None:
        """Open a block of `valid.shape[1]` new slots, which every layer then writes with `update`. `upcoming`
        slots are known to follow, so the first allocation can make room for them too."""
        self._start, self._upcoming = self.length, upcoming
        self.key_valid = valid if self.key_valid is None else torch.cat([self.key_valid, valid], dim=1)

    def end(self, valid: torch.Tensor) -> None:
        """Close the block; positions advance by the valid tokens it held."""
        self.length = self.key_valid.shape[1]
        counted = valid.sum(dim=1)
        self.next_position = counted if self.next_position is None else self.next_position + counted

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

    def write_prefix(self, valid: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                     upcoming: int) -> None:
        """Store position-free prefix keys/values (per layer: (B, H_kv, P, D)) in front of any text."""
        if self.length:
            raise RuntimeError("the prefix must be written before any text")
        self.begin(valid, upcoming)
        for layer_idx in range(len(self.keys)):
            self.update(layer_idx, keys[layer_idx], values[layer_idx])
        self.length = self.prefix_len = valid.shape[1]

    def _grow(self, buf: torch.Tensor | None, like: torch.Tensor, needed: int) -> torch.Tensor:
        if buf is None:
            capacity = needed + self._upcoming + self.reserve
        else:  # geometric growth keeps a hand-written decode loop linear in time
            capacity = max(needed, 2 * buf.shape[2])
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
