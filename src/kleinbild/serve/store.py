"""Result files of `response_format=url` requests."""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_NAME = re.compile(r"[A-Za-z0-9_-]{24}\.(png|jpeg|webp)")  # what put() names files


class OutputStore:
    """Result files under one folder, named by random ids that only this object hands out.

    Lookups go through the id table, never through a path built from a request, so nothing outside the
    folder can be read. Files expire `ttl` seconds after they were written. A folder of the user's own outlives
    the server: its unexpired results are served again after a restart (or a kill), the expired ones purged.
    """

    def __init__(self, folder: str | Path | None, ttl: float):
        self.ttl = ttl
        self._owned = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="kleinbild-serve-")) if folder is None else Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, tuple[Path, str, float]] = {}
        self._lock = threading.Lock()
        if not self._owned:
            self._adopt()

    def _adopt(self) -> None:
        """Take back what an earlier run left: files with this store's names, expiring by their write time."""
        now = time.time()
        for path in self.folder.iterdir():
            fmt = path.suffix.lstrip(".")
            if not (fmt in MEDIA_TYPES and _NAME.fullmatch(path.name) and path.is_file()):
                continue
            expires = path.stat().st_mtime + self.ttl
            if expires <= now:
                path.unlink(missing_ok=True)
            else:
                self._files[path.name] = (path, MEDIA_TYPES[fmt], expires)

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
        """A temporary folder goes with the server; a folder of the user's keeps its unexpired results."""
        if self._owned:
            with self._lock:
                self._files.clear()
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            self.purge()
