"""Result files of `response_format=url` requests, and encoding images for the wire."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

from kleinbild import images

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class OutputStore:
    """Result files under one folder, named by random ids that only this object hands out.

    Lookups go through the id table, never through a path built from a request, so nothing outside the
    folder can be read. Files expire after `ttl` seconds.
    """

    def __init__(self, folder: str | Path | None, ttl: float):
        self.ttl = ttl
        self._owned = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="kleinbild-serve-")) if folder is None else Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, tuple[Path, str, float]] = {}
        self._lock = threading.Lock()

    def put(self, data: bytes, fmt: str) -> str:
        name = f"{secrets.token_urlsafe(18)}.{fmt}"
        path = self.folder / name
        path.write_bytes(data)
        with self._lock:
            self._files[name] = (path, MEDIA_TYPES[fmt], time.time() + self.ttl)
        return name

    def get(self, name: str) -> tuple[Path, str, float] | None:
        with self._lock:
            item = self._files.get(name)
        if item is None:
            return None
        if item[2] <= time.time():
            self.drop(name)
            return None
        return item

    def drop(self, name: str) -> None:
        with self._lock:
            item = self._files.pop(name, None)
        if item is not None:
            item[0].unlink(missing_ok=True)

    def purge(self) -> int:
        now = time.time()
        with self._lock:
            old = [n for n, (_, _, exp) in self._files.items() if exp <= now]
        for n in old:
            self.drop(n)
        return len(old)

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        with self._lock:
            names = list(self._files)
        for n in names:
            self.drop(n)
        if self._owned:
            shutil.rmtree(self.folder, ignore_errors=True)


def encode_image(img: Image.Image, fmt: str, compression: int, meta: dict[str, Any]) -> bytes:
    """PNG (lossless), JPEG or WebP at `compression` quality, each carrying `meta` as the CLI writes it."""
    return images.encode_image(img, fmt, meta, quality=compression)
