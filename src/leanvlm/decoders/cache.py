"""Key/value cache for generation: one preallocated buffer per layer, written in place.

Slots hold `[prefix | text]` keys in time order, the same layout the mask builder expects; the prefix (HiMix's vision
keys) is written once at prefill, in the layers that have one (sparse-layer HiMix leaves it out of the others, whose
buffers then hold the text slots alone). The rows of a batch share one slot count: a row's valid text slots are
contiguous at the right end of the text segment, its padding slots are marked invalid in `key_valid`. Policies that
drop tokens inside the LLM (fastv, pyramiddrop) hide a slot's keys from the layers after the drop (`hide`): the slot
stays, so every layer keeps one layout. Rows can leave (`select`) and join (`merge`) a running batch, so a server can
keep decoding while requests finish and arrive.
"""

from __future__ import annotations

from typing import Protocol

import torch


def hidden_from(known: list[int], until: torch.Tensor, layers: int) -> list[int]:
    """The layers from which some key is hidden: `known` and those `until` (visible to layers < until) adds."""
    return sorted(set(known) | set(until[until < layers].unique().tolist()))


class DecoderCache(Protocol):
    """What the layer runner and the model need from a key/value cache. A prefill writes the optional prefix, then
    every forward opens a block (`begin`), lets each layer write its keys (`update`) and closes it (`end`)."""

    key_valid: torch.Tensor | None  # (B, length) bool, False for padding slots
    prefix_len: int  # position-free slots in front of the text
    length: int  # filled slots, prefix included
    next_position: torch.Tensor | None  # (B,) next text position per row
    key_until: torch.Tensor | None  # (B, length) layers that see each slot's keys (None: all of them)
    hidden_from: list[int]  # the layers from which `key_until` hides keys, sorted

    @property
    def batch_size(self) -> int | None: ...

    def write_prefix(self, valid: torch.Tensor, keys: list[torch.Tensor | None], values: list[torch.Tensor | None],
                     upcoming: int) -> None: ...

    def begin(self, valid: torch.Tensor, upcoming: int = 0) -> None: ...

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def end(self, valid: torch.Tensor, positions: torch.Tensor, after: torch.Tensor | None = None) -> None: ...

    def hide(self, until: torch.Tensor) -> None: ...

    # what an engine needs to run a changing batch
    def row_lengths(self) -> torch.Tensor: ...

    def select(self, rows) -> None: ...

    def merge(self, other) -> None: ...  # `other`: a cache of the same kind


class KVCache:
    """The whole-batch `DecoderCache`: one (B, H_kv, slots, head_dim) key and value buffer per layer."""

    def __init__(self, num_layers: int, reserve: int = 0):
        self.reserve = reserve  # extra slots to allocate with the first block (e.g. max_new_tokens)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_valid: torch.Tensor | None = None  # (B, length) bool
        self.prefix_len = 0
        self.prefix_layers: list[bool] | None = None  # which layers hold the prefix slots (None: every layer)
        self.length = 0  # filled slots
        self.next_position: torch.Tensor | None = None  # (B,) next text position per sample
        self.key_until: torch.Tensor | None = None  # (B, length): a slot's keys are seen by layers < key_until
        self.hidden_from: list[int] = []
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
        if self.key_until is not None:  # new slots are seen by every layer until hidden
            self.key_until = torch.cat([self.key_until, self._all_layers(valid)], dim=1)

    def hide(self, until: torch.Tensor) -> None:
        """Let only layers < `until` (B, T) see the keys of the open block's T slots (`len(keys)`: every layer)."""
        if self.key_until is None:
            self.key_until = self._all_layers(self.key_valid)
        self.key_until[:, self._start :] = until
        self.hidden_from = hidden_from(self.hidden_from, until, len(self.keys))

    def _all_layers(self, like: torch.Tensor) -> torch.Tensor:
        return torch.full(like.shape, len(self.keys), dtype=torch.int16, device=like.device)

    def end(self, valid: torch.Tensor, positions: torch.Tensor, after: torch.Tensor | None = None) -> None:
        """Close the block, whose tokens had `positions` (B, T): the next one follows each row's last (blocks are
        padded on the left, so a row's last slot is its last token), or is `after` (B,) when given; a row with no
        token in the block keeps its next position. Positions may skip what the sequence does not hold, such as
        vica's vision tokens."""
        self.length = self.key_valid.shape[1]
        held = valid.any(dim=1)
        before = self.next_position if self.next_position is not None else torch.zeros_like(positions[:, -1])
        self.next_position = torch.where(held, positions[:, -1] + 1 if after is None else after, before)

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write key/value (B, H_kv, T, D) into the open block; return all keys/values so far (views)."""
        start = self._start - self._offset(layer_idx)
        stop = start + key.shape[2]
        buf_k, buf_v = self.keys[layer_idx], self.values[layer_idx]
        if buf_k is None or buf_k.shape[2] < stop:
            buf_k, buf_v = self._grow(buf_k, key, start, stop), self._grow(buf_v, value, start, stop)
            self.keys[layer_idx], self.values[layer_idx] = buf_k, buf_v
        buf_k[:, :, start:stop] = key
        buf_v[:, :, start:stop] = value
        return buf_k[:, :, :stop], buf_v[:, :, :stop]

    def _offset(self, layer_idx: int) -> int:
        """Slots a layer does not store: the prefix, in a layer without one."""
        has_prefix = self.prefix_layers is None or self.prefix_layers[layer_idx]
        return 0 if has_prefix else self.prefix_len

    def write_prefix(self, valid: torch.Tensor, keys: list[torch.Tensor | None], values: list[torch.Tensor | None],
                     upcoming: int) -> None:
        """Store position-free prefix keys/values (per layer: (B, H_kv, P, D), or None for a layer without a prefix)
        in front of any text."""
        if self.length:
            raise RuntimeError("the prefix must be written before any text")
        self.begin(valid, upcoming)
        self.prefix_layers = [key is not None for key in keys]
        for layer_idx, (key, value) in enumerate(zip(keys, values, strict=True)):
            if key is not None:
                self.update(layer_idx, key, value)
        self.length = self.prefix_len = valid.shape[1]

    def _grow(self, buf: torch.Tensor | None, like: torch.Tensor, start: int, needed: int) -> torch.Tensor:
        if buf is None:
            capacity = needed + self._upcoming + self.reserve
        else:  # geometric growth keeps a hand-written decode loop linear in time
            capacity = max(needed, 2 * buf.shape[2])
        new = like.new_zeros(like.shape[0], like.shape[1], capacity, like.shape[3])
        if buf is not None:
            new[:, :, :start] = buf[:, :, :start]
        return new

    def nbytes(self) -> int:
        """Bytes of the filled key/value slots over all layers."""
        total = 0
        for layer_idx, bufs in enumerate(zip(self.keys, self.values, strict=True)):
            for buf in bufs:
                if buf is not None:
                    total += buf[:, :, : self.length - self._offset(layer_idx)].numel() * buf.element_size()
        return total

    # ------------------------------------------------------------------ rows leave and join a running batch
    def row_lengths(self) -> torch.Tensor:
        """(B,) valid slots of each row (its prefix and text keys): what the row really holds."""
        return self.key_valid.sum(dim=1)

    def select(self, rows) -> None:
        """Keep only `rows` (indices or a (B,) bool mask), in that order, e.g. to drop finished requests. Slots no
        kept row uses are freed: prefix slots invalid in every row, and text slots left of every row's text."""
        self._check_closed("select rows of")
        rows = torch.as_tensor(rows, device=self.key_valid.device)
        if rows.dtype == torch.bool:
            if rows.shape != (self.batch_size,):
                raise ValueError(f"A row mask needs one entry per row ({self.batch_size}), got {tuple(rows.shape)}.")
            rows = rows.nonzero().flatten()
        rows = rows.long()
        listed = rows.tolist()
        if any(not 0 <= row < self.batch_size for row in listed) or len(set(listed)) < len(listed):
            raise ValueError(f"Rows {rows.tolist()} must be distinct indices in 0..{self.batch_size - 1}.")
        if not len(rows):  # back to an empty cache, which a later merge fills again
            self.__init__(len(self.keys), self.reserve)
            return
        valid = self.key_valid[rows]  # (B', length)
        prefix_slots = valid[:, : self.prefix_len].any(dim=0).nonzero().flatten()
        text_used = valid[:, self.prefix_len :].any(dim=0)
        first_text = int(text_used.long().argmax()) if bool(text_used.any()) else text_used.shape[0]
        text_slots = torch.arange(self.prefix_len + first_text, self.length, device=valid.device)
        slots = torch.cat([prefix_slots, text_slots])
        room = self._room()
        for store in (self.keys, self.values):
            for layer_idx, buf in enumerate(store):
                offset = self._offset(layer_idx)
                layer_slots = slots if not offset else text_slots - offset
                kept = buf.new_zeros(len(rows), buf.shape[1], len(layer_slots) + room, buf.shape[3])
                kept[:, :, : len(layer_slots)] = buf.index_select(0, rows).index_select(2, layer_slots)
                store[layer_idx] = kept  # (B', H_kv, S, D)
        self.key_valid = valid[:, slots]
        if self.key_until is not None:
            self.key_until = self.key_until[rows][:, slots]
        self.next_position = self.next_position[rows]
        self.prefix_len, self.length = len(prefix_slots), len(slots)

    def merge(self, other: KVCache) -> None:
        """Append the rows of `other` (e.g. a request prefilled alone) after this cache's rows. Each segment is
        padded on the left with invalid slots to the longer of the two, which keeps every row's text keys
        contiguous at the right end: attention, sliding windows included, stays exactly what it was. `other` is
        consumed: its buffers may be shared, so do not write to it afterwards."""
        other._check_closed("merge")
        if len(other.keys) != len(self.keys):
            raise ValueError(f"Cannot merge a cache of {len(other.keys)} layers into one of {len(self.keys)}.")
        if self.keys[0] is not None and other.keys[0] is not None:
            mine, theirs = self.keys[0], other.keys[0]
            if (mine.dtype, mine.device, mine.shape[1], mine.shape[3]) != (
                    theirs.dtype, theirs.device, theirs.shape[1], theirs.shape[3]):
                raise ValueError(
                    f"Cannot merge a cache of {theirs.dtype} on {theirs.device} ({theirs.shape[1]} KV heads x "
                    f"{theirs.shape[3]}) into one of {mine.dtype} on {mine.device} ({mine.shape[1]} x "
                    f"{mine.shape[3]}); prefill both with the same model, dtype and device."
                )
        if self.key_valid is None:  # an empty cache takes the rows as they are
            self.keys, self.values = list(other.keys), list(other.values)
            self.key_valid, self.next_position = other.key_valid, other.next_position
            self.prefix_len, self.length, self.prefix_layers = other.prefix_len, other.length, other.prefix_layers
            self.key_until, self.hidden_from = other.key_until, other.hidden_from
            return
        self._check_closed("merge into")
        with_prefix = [cache.prefix_layers for cache in (self, other) if cache.prefix_len]
        if len(with_prefix) == 2 and with_prefix[0] != with_prefix[1]:
            raise ValueError("Cannot merge caches whose prefixes sit in different layers; prefill both with the "
                             "same model.")
        prefix_layers = with_prefix[0] if with_prefix else None
        prefix_len = max(self.prefix_len, other.prefix_len)
        text_len = max(self.length - self.prefix_len, other.length - other.prefix_len)
        room = max(self._room(), other._room())
        batch = self.batch_size + other.batch_size
        has_prefix = [prefix_layers is None or prefix_layers[i] for i in range(len(self.keys))]
        keys, values = [], []
        for buf, layer_prefix in zip(self.keys, has_prefix, strict=True):
            slots = prefix_len * layer_prefix + text_len + room
            keys.append(buf.new_zeros(batch, buf.shape[1], slots, buf.shape[3]))
            values.append(buf.new_zeros(batch, buf.shape[1], slots, buf.shape[3]))
        valid = self.key_valid.new_zeros(batch, prefix_len + text_len)
        until = None
        if self.key_until is not None or other.key_until is not None:
            until = self._all_layers(valid)
        self._place(keys, values, valid, until, 0, prefix_len, text_len, has_prefix)
        other._place(keys, values, valid, until, self.batch_size, prefix_len, text_len, has_prefix)
        self.keys, self.values, self.key_valid, self.key_until = keys, values, valid, until
        self.hidden_from = sorted(set(self.hidden_from) | set(other.hidden_from))
        self.next_position = torch.cat([self.next_position, other.next_position])
        self.prefix_len, self.length, self.prefix_layers = prefix_len, prefix_len + text_len, prefix_layers

    def _place(self, keys, values, valid, until, first_row: int, prefix_len: int, text_len: int,
               has_prefix: list[bool]) -> None:
        """Write this cache's rows into rows `first_row:` of larger buffers (per layer (B, H_kv, S, D)) and their
        key_valid (B, prefix_len + text_len) and key_until (or None), each segment padded on the left: prefix
        slots end at `prefix_len`,
        text slots at `prefix_len + text_len` (`prefix_len` earlier in the layers without a prefix)."""
        rows = slice(first_row, first_row + self.batch_size)
        end = prefix_len + text_len
        text_count = self.length - self.prefix_len
        prefix = slice(prefix_len - self.prefix_len, prefix_len)
        for target, source in ((keys, self.keys), (values, self.values)):
            for layer_idx, (dst, buf) in enumerate(zip(target, source, strict=True)):
                shift, own = (0 if has_prefix[layer_idx] else prefix_len), self.prefix_len - self._offset(layer_idx)
                if has_prefix[layer_idx]:
                    dst[rows, :, prefix] = buf[:, :, :own]
                dst[rows, :, end - text_count - shift : end - shift] = buf[:, :, own : own + text_count]
        valid[rows, prefix] = self.key_valid[:, : self.prefix_len]
        valid[rows, end - text_count : end] = self.key_valid[:, self.prefix_len :]
        if until is not None and self.key_until is not None:
            until[rows, prefix] = self.key_until[:, : self.prefix_len]
            until[rows, end - text_count : end] = self.key_until[:, self.prefix_len :]

    def _room(self) -> int:
        """Allocated slots after the filled ones (kept when rows move, so decoding does not reallocate at once)."""
        return self.keys[0].shape[2] - (self.length - self._offset(0))

    def _check_closed(self, action: str) -> None:
        if self.key_valid is None or self.length != self.key_valid.shape[1]:
            raise RuntimeError(
                f"Cannot {action} a cache that is empty or has a block open; prefill it (and finish the forward) "
                "first."
            )
