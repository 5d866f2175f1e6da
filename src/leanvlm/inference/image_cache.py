"""The image-context cache: encoded images by content, so a second question about an image skips the vision encoder
(and, for HiMix, every layer's vision K/V projection). Least recently used entries leave first once the cache holds
more than its byte budget."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from leanvlm.decoders.base import ImageContext


def content_key(data: bytes) -> str:
    """The cache key of an image: a hash of its file bytes (the same picture re-encoded is another image)."""
    return hashlib.sha256(data).hexdigest()


class ImageCache:
    """{(model, content key): one image's `ImageContext`}, bounded in bytes. Not thread-safe: the engine's loop is
    its only user."""

    def __init__(self, max_bytes: int, model_id: str = ""):
        if max_bytes < 0:
            raise ValueError(f"The image cache size must be >= 0 bytes (0 turns it off), got {max_bytes}.")
        self.max_bytes, self.model_id = max_bytes, model_id
        self._entries: OrderedDict[tuple[str, str], ImageContext] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> ImageContext | None:
        entry = self._entries.get((self.model_id, key))
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end((self.model_id, key))
        return entry

    def put(self, key: str, context: ImageContext) -> None:
        """Keep `context` (one image) unless it alone exceeds the budget; evict the least recently used to fit."""
        size = context.nbytes()
        if size > self.max_bytes:
            return
        old = self._entries.pop((self.model_id, key), None)
        if old is not None:
            self.bytes -= old.nbytes()
        self._entries[(self.model_id, key)] = context
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.nbytes()
            self.evictions += 1
