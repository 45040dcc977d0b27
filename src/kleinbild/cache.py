"""Content-keyed caches: prompt embeddings and reference latents, so an edit loop skips the encoders."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
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


def cached_prompts(cache: ContentCache, prompts: Sequence[str], stats: list[dict[str, Any]],
                   encode: Callable[[list[str]], Tensor]) -> list[Tensor]:
    """(1, L, D) embedding per prompt; misses go through `encode` together, once per distinct prompt.

    `stats[i]` gets prompt i's hit or miss and the seconds a hit saved.
    """
    keys = [content_key(b"prompt", p.encode("utf-8", "surrogatepass")) for p in prompts]
    rows: dict[str, Tensor] = {}
    todo: dict[str, str] = {}
    for k, p, st in zip(keys, prompts, stats, strict=True):
        if k in rows or k in todo:
            st["prompt_hits"] = st.get("prompt_hits", 0) + (k in rows)
            st["prompt_misses"] = st.get("prompt_misses", 0) + (k in todo)
            continue
        got = cache.get(k)
        if got is None:
            todo[k] = p
            st["prompt_misses"] = st.get("prompt_misses", 0) + 1
        else:
            rows[k] = got[0]
            st["prompt_hits"] = st.get("prompt_hits", 0) + 1
            st["saved_seconds"] = st.get("saved_seconds", 0.0) + got[1]
    if todo:
        t0 = time.perf_counter()
        emb = encode(list(todo.values()))
        cost = (time.perf_counter() - t0) / len(todo)
        for i, k in enumerate(todo):
            # A clone, so a cached row does not keep the whole batch's storage alive.
            rows[k] = emb[i : i + 1].clone() if len(todo) > 1 else emb
            cache.put(k, rows[k], cost)
    return [rows[k] for k in keys]


def cached_latents(cache: ContentCache, images: Sequence[Any], digests: Sequence[str], stats: dict[str, Any],
                   encode: Callable[[Any], Tensor]) -> list[Tensor]:
    """(1, C, h, w) latent per prepared image, from the cache when the same pixels were encoded before."""
    out = []
    for im, k in zip(images, digests, strict=True):
        got = cache.get(k)
        if got is None:
            t0 = time.perf_counter()
            lat = encode(im)
            cache.put(k, lat, time.perf_counter() - t0)
            stats["reference_misses"] = stats.get("reference_misses", 0) + 1
        else:
            lat = got[0]
            stats["reference_hits"] = stats.get("reference_hits", 0) + 1
            stats["saved_seconds"] = stats.get("saved_seconds", 0.0) + got[1]
        out.append(lat)
    return out
