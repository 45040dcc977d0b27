"""Content-keyed caches: prompt embeddings and reference latents, so an edit loop skips the encoders."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

from torch import Tensor


def content_key(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        # Length-prefixed, so ("ab", "c") and ("a", "bc") cannot collide.
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


class ContentCache:
    """A bounded LRU of tensors keyed by a digest of their inputs, counting hits, misses and the time hits saved.

    Each entry remembers what computing it cost, so `saved_seconds` is the encoder time that hits skipped.
    `max_entries=0` disables it. Safe to read from other threads while one thread uses it.
    """

    def __init__(self, max_entries: int):
        self.max_entries = max(0, int(max_entries))
        self.hits = 0
        self.misses = 0
        self.saved_seconds = 0.0
        self._items: OrderedDict[str, tuple[Tensor, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[Tensor, float] | None:
        """The cached value and the seconds this hit saved, or None (a miss)."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            self.saved_seconds += item[1]
            return item

    def put(self, key: str, value: Tensor, cost_seconds: float) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            self._items[key] = (value, cost_seconds)
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def resize(self, max_entries: int) -> None:
        with self._lock:
            self.max_entries = max(0, int(max_entries))
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "entries": len(self._items),
                "max_entries": self.max_entries,
                "hits": self.hits,
                "misses": self.misses,
                "saved_seconds": round(self.saved_seconds, 4),
            }
