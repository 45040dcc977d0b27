"""Quantized layers in files: the official single-file layout (see `kleinbild.quant` for the formats), reading it
into QuantWeights, writing it, and installing a file's quantized layers into a meta-built transformer."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kleinbild.files import read_header, read_tensors, strip_prefix
from kleinbild.ggml import GGML_TYPES
from kleinbild.quant import (
    BLOCK,
    GGML_QUANTIZED,
    QuantWeight,
    _roundup,
    check_format,
    default_quantizable,
    install,
    quantize_state,
    swap_nibbles,
    swizzle_block_scales,
    unswizzle_block_scales,
)

_MARKER = {"fp8": "float8_e4m3fn", "nvfp4": "nvfp4", "int8": "int8_rowwise"}
_FROM_MARKER = {v: k for k, v in _MARKER.items()}
_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "comfy_quant", "scale_weight", "scale_input")


def _input_scale(name: str, t: Tensor) -> Tensor:
    """A layer's per-tensor activation scale (FP8 compute divides activations by it), checked: one positive number."""
    v = t.float().reshape(-1)
    if v.numel() != 1 or not bool(torch.isfinite(v).all()) or float(v[0]) <= 0:
        shown = v.tolist() if v.numel() <= 4 else f"shape {tuple(t.shape)}"
        raise ValueError(f"{name}.input_scale is {shown}: an activation scale is one positive number; re-export the "
                         "file, or drop the tensor to scale activations per call")
    return v.reshape(())


def _marker(fmt: str) -> Tensor:
    return torch.tensor(list(json.dumps({"format": _MARKER[fmt]}).encode()), dtype=torch.uint8)


def _read_marker(t: Tensor, name: str) -> str:
    try:
        conf = json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8"))
        marker = conf["format"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{name}.comfy_quant is not a JSON object with a 'format'") from None
    if marker == "gguf" and conf.get("type") in GGML_QUANTIZED:  # gguf_file's marker for a block-format layer
        return str(conf["type"])
    if marker not in _FROM_MARKER:
        raise ValueError(
            f"layer {name} uses quantization format {marker!r}; kleinbild reads {sorted(_FROM_MARKER)} "
            "(fp8, nvfp4, int8 per row)"
        )
    return _FROM_MARKER[marker]


def to_file_tensors(name: str, qw: QuantWeight) -> dict[str, Tensor]:
    """The tensors one quantized layer is stored as (see the module docstring)."""
    out = {f"{name}.comfy_quant": _marker(qw.format)}
    if qw.format == "nvfp4":
        assert qw.block_scale is not None
        out[f"{name}.weight"] = swap_nibbles(qw.data)
        out[f"{name}.weight_scale"] = swizzle_block_scales(qw.block_scale)
        out[f"{name}.weight_scale_2"] = qw.scale.float().reshape(())
    else:
        out[f"{name}.weight"] = qw.data
        out[f"{name}.weight_scale"] = qw.scale.float()
    if qw.input_scale is not None:
        out[f"{name}.input_scale"] = qw.input_scale.float()
    return {k: v.contiguous().cpu() for k, v in out.items()}


def _detect(name: str, state: Mapping[str, Tensor]) -> str | None:
    """The format of layer `name` in a file without markers, from its tensors' dtypes."""
    w = state.get(f"{name}.weight")
    if w is None:
        return None
    has_scale = f"{name}.weight_scale" in state or f"{name}.scale_weight" in state
    if w.dtype == torch.float8_e4m3fn and has_scale:
        return "fp8"
    if w.dtype == torch.uint8 and f"{name}.weight_scale_2" in state:
        return "nvfp4"
    if w.dtype == torch.int8 and has_scale:
        return "int8"
    return None


def from_file_tensors(state: dict[str, Tensor]) -> dict[str, QuantWeight]:
    """Pop every quantized layer's tensors out of an official-named state dict (prefixes already stripped) and
    return them as QuantWeights by module name. Plain tensors stay in `state`."""
    names = {k.rsplit(".", 1)[0] for k in state if k.endswith((".comfy_quant", ".weight_scale_2", ".weight_scale",
                                                              ".scale_weight"))}
    layers: dict[str, QuantWeight] = {}
    for name in sorted(names):
        fmt = _read_marker(state[f"{name}.comfy_quant"], name) if f"{name}.comfy_quant" in state else None
        fmt = fmt or _detect(name, state)
        if fmt is None:
            continue
        w = state.get(f"{name}.weight")
        if w is None or w.ndim != 2:
            raise ValueError(f"quantized layer {name} has no 2-D weight tensor")
        if fmt in GGML_QUANTIZED:
            layers[name] = _ggml_layer(name, fmt, w)
            state.pop(f"{name}.weight")
            state.pop(f"{name}.comfy_quant")
            continue
        scale = state.get(f"{name}.weight_scale", state.get(f"{name}.scale_weight"))
        if scale is None:
            raise ValueError(f"quantized layer {name} ({fmt}) has no weight_scale")
        input_scale = state.get(f"{name}.input_scale", state.get(f"{name}.scale_input"))
        if fmt == "fp8":
            if w.dtype != torch.float8_e4m3fn:
                raise ValueError(f"{name}.weight is {w.dtype}; an fp8 layer stores float8_e4m3fn")
            n = w.shape[0]
            s = scale.float()
            if s.numel() == 1:
                s = s.reshape(())
            elif s.numel() == n:
                s = s.reshape(n)
            else:
                raise ValueError(f"{name}.weight_scale has shape {tuple(scale.shape)}: expected one value or {n}")
            qw = QuantWeight("fp8", tuple(w.shape), w, s)
        elif fmt == "int8":
            if w.dtype != torch.int8 or scale.numel() != w.shape[0]:
                raise ValueError(f"{name}: an int8 layer stores an int8 weight and one fp32 scale per output row")
            qw = QuantWeight("int8", tuple(w.shape), w, scale.float().reshape(-1))
        else:
            if w.dtype != torch.uint8:
                raise ValueError(f"{name}.weight is {w.dtype}; an nvfp4 layer stores packed uint8")
            n, k = w.shape[0], w.shape[1] * 2
            scale2 = state.get(f"{name}.weight_scale_2")
            if scale2 is None or scale2.numel() != 1:
                raise ValueError(f"{name}: an nvfp4 layer needs a per-tensor weight_scale_2")
            if scale.dtype != torch.float8_e4m3fn:
                raise ValueError(f"{name}.weight_scale is {scale.dtype}; nvfp4 block scales are float8_e4m3fn")
            rows, cols = n, k // BLOCK
            if tuple(scale.shape) == (_roundup(rows, 128), _roundup(cols, 4)):
                block = unswizzle_block_scales(scale, rows, cols)
            elif tuple(scale.shape) == (rows, cols):
                block = scale.contiguous()  # only reachable when the tiled shape differs: row-major scales
            else:
                raise ValueError(
                    f"{name}.weight_scale has shape {tuple(scale.shape)}; for a {n}x{k} weight expected the tiled "
                    f"{(_roundup(rows, 128), _roundup(cols, 4))} or row-major {(rows, cols)}"
                )
            qw = QuantWeight("nvfp4", (n, k), swap_nibbles(w), scale2.float().reshape(()), block)
            state.pop(f"{name}.weight_scale_2", None)
        qw.input_scale = None if input_scale is None else _input_scale(name, input_scale)
        for suffix in ("weight", *_SUFFIXES):
            state.pop(f"{name}.{suffix}", None)
        layers[name] = qw
    return layers


def _ggml_layer(name: str, fmt: str, w: Tensor) -> QuantWeight:
    block, size = GGML_TYPES[fmt]
    if w.dtype != torch.uint8 or w.shape[1] % size:
        raise ValueError(f"{name}.weight ({fmt}) must be uint8 rows of whole {size}-byte blocks")
    return QuantWeight(fmt, (w.shape[0], w.shape[1] // size * block), w, torch.ones(()))


def logical_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a (possibly quantized) official file as the unquantized model has them: scale and marker
    tensors dropped, packed NVFP4 weights at their full width, ComfyUI prefixes stripped. Reads headers only."""
    raw = {strip_prefix(k): v for k, v in read_header(files).items()}
    out = {}
    for k, (shape, dtype) in raw.items():
        name, _, leaf = k.rpartition(".")
        if leaf in _SUFFIXES:
            continue
        if leaf == "weight" and dtype == "U8" and f"{name}.weight_scale_2" in raw and len(shape) == 2:
            shape = (shape[0], shape[1] * 2)
        out[k] = shape
    return out


def save_quantized(
    state: Mapping[str, Tensor],
    path: Path | str,
    fmt: str,
    which: Callable[[str, tuple[int, ...]], bool] = default_quantizable,
    dtype: torch.dtype | None = torch.bfloat16,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write an official-named transformer state dict as a quantized single file (the layout above); the tensors that
    are not quantized are stored in `dtype` (None: as they are). Returns a summary (layers, bytes)."""
    from safetensors.torch import save_file

    fmt = check_format(fmt)
    plain = dict(state)
    t0 = time.perf_counter()
    layers = quantize_state(plain, fmt, which=which)
    out: dict[str, Tensor] = {}
    for name, qw in layers.items():
        out.update(to_file_tensors(name, qw))
    for k, v in plain.items():
        keep = dtype is None or not v.is_floating_point() or v.dtype == torch.float8_e4m3fn
        out[k] = (v if keep else v.to(dtype)).contiguous().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"format": "pt", "kleinbild_quant": fmt, **(metadata or {})}
    save_file(out, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return {"format": fmt, "layers": len(layers), "bytes": path.stat().st_size, "seconds": time.perf_counter() - t0}


def load_quantized_file(path: Path | str) -> tuple[dict[str, Tensor], dict[str, QuantWeight]]:
    """(plain tensors, quantized layers) of a single file, prefixes stripped."""
    state = read_tensors([Path(path)], rename=strip_prefix)
    layers = from_file_tensors(state)
    return state, layers


def collect_quantized(state: dict[str, Tensor], quant: str | None, device: torch.device | str,
                      which: Callable[[str, tuple[int, ...]], bool] = default_quantizable,
                      what: str = "the transformer file") -> tuple[dict[str, QuantWeight], str | None]:
    """Take the file's quantized layers (and, with `quant`, quantize the rest of the selected layers) out of
    `state`: (layers by module name, the format in use or None)."""
    layers = from_file_tensors(state)
    in_file = sorted({qw.format for qw in layers.values()})
    if quant is not None:
        quant = check_format(quant)
        if in_file and in_file != [quant]:
            raise ValueError(f"{what} is already quantized ({', '.join(in_file)}); load it without quantizing, "
                             f"or quantize the bf16 original to {quant}")
        layers.update(quantize_state(state, quant, device=device, which=which))
    return layers, (quant or "+".join(in_file)) if layers else None


def prepare_quantized(model: nn.Module, state: dict[str, Tensor], quant: str | None,
                      device: torch.device | str) -> str | None:
    """Before strict loading: `collect_quantized`, then install the layers in the meta-built `model`. Returns the
    format in use, or None."""
    layers, used = collect_quantized(state, quant, device)
    if layers:
        install(model, layers, device)
    return used
