"""Reading safetensors files: the weight files of a folder, headers, lazily read tensors, and giving the mapped
pages of tensors that are no longer needed back to the OS. A leaf: it imports nothing else of kleinbild."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

# ComfyUI-saved single files prefix the official names.
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


class ModelNotFoundError(ValueError):
    """A model path or id that holds no usable model; the message says what was looked for."""


def strip_prefix(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def safetensors_files(folder: Path, stem: str) -> list[Path]:
    """The weight files of a component folder: `stem.safetensors`, or the shards listed in its index."""
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelNotFoundError(f"{index} lists shards that are not there: {missing}")
        return files
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise ModelNotFoundError(f"no .safetensors weights in {folder}")


class CorruptFileError(ValueError):
    """A weight file that cannot be read as safetensors (truncated, empty, not safetensors at all)."""


def unreadable(path: str | Path, e: BaseException) -> CorruptFileError:
    detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return CorruptFileError(f"{path} is not a readable .safetensors file ({detail}); it may be truncated or "
                            "corrupt: download or convert it again")


# What safetensors raises on a bad file: its own error (a Rust panic's message), or OS and value errors.
_READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError)


def read_header(files: Iterable[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """(shape, dtype name such as "BF16") of every tensor in the files, from their headers only."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), sl.get_dtype())
        except _READ_ERRORS as e:
            raise unreadable(f, e) from None
    return out


def read_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    return {k: shape for k, (shape, _) in read_header(files).items()}


def read_tensors(
    files: Iterable[Path],
    wanted: Callable[[str], bool] = lambda k: True,
    rename: Callable[[str], str] = lambda k: k,
) -> dict[str, Tensor]:
    """Read the tensors whose (renamed) key is wanted; the others are never read from disk."""
    out: dict[str, Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    name = rename(k)
                    if wanted(name):
                        out[name] = fh.get_tensor(k)
        except _READ_ERRORS as e:
            raise unreadable(f, e) from None
    return out


def _file_mappings() -> list[tuple[int, int, str]]:
    out = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi, parts[5].strip()))
    return out


def release_file_pages(tensors: Iterable[Tensor]) -> int:
    """Drop this process's resident pages under tensors that are views of a memory-mapped .safetensors or .gguf
    file (madvise DONTNEED; Linux only). kleinbild never writes to these mappings, so a later read faults the same
    values in again from the file; tensors in anonymous memory are left alone (there the call would zero them).
    Returns bytes released."""
    import ctypes
    import mmap
    import sys

    tensors = [t for t in tensors if t.device.type == "cpu" and t.numel()]
    if sys.platform != "linux" or not tensors:
        return 0
    try:
        maps = _file_mappings()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    page, released = mmap.PAGESIZE, 0
    for t in tensors:
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        if not any(lo <= start and end <= hi and path.endswith((".safetensors", ".gguf")) for lo, hi, path in maps):
            continue
        a, b = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
        if b > a and madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), 4) == 0:  # 4: MADV_DONTNEED
            released += b - a
    return released


