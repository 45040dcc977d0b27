"""The memory a model will need, computed before anything is loaded, and the settings that fit a budget.

Weights: the bytes each component holds once loaded, from the files' own tensors (architecture read from their
shapes): a file's quantized tensors at their stored size; float tensors in the load dtype; with `quant` /
`text_quant`, the layers those formats replace at the quantized size (`quant.estimate_bytes`). The text encoder
counts only the layers up to its deepest tap, which is all that is read.

Working memory per stage, in the compute dtype, from coefficients measured at klein-4b shapes in bf16 (peak
memory minus resident weights): a transformer pass holds about T bytes x hidden size per token (the text encoder
the same per prompt token), the decoder about P bytes x its base width per output pixel; T = 44, P = 20 on a GPU
(peak allocated on an H200 at 1024x1024), T = 80, P = 14 on the CPU (peak RSS at 256-1024 px; oneDNN's weight
copies and the channels-last sub-pixel decoder shift the balance). A weight that is dequantized just in time
(GGUF, and fp8 / nvfp4 where the device has no native kernel) adds its largest layer, in float32 and the compute
dtype for GGUF. Sizes are in GiB (2^30 bytes), the unit graphics cards are sold in.

Peak: `none` holds every component plus the largest stage. `model` on an accelerator holds one component at a time
(device memory); on the CPU the text encoder exists only while encoding. `sequential` on an accelerator holds the
transformer's largest block plus its small resident parts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from kleinbild import gguf_file
from kleinbild.autoencoder import AutoEncoder
from kleinbild.components import text_quantizable
from kleinbild.config import ModelPreset, get_preset
from kleinbild.files import read_header, strip_prefix
from kleinbild.ggml import GGML_TYPES
from kleinbild.loading import LoadOptions, ModelFiles, _hf_text_key, locate_with
from kleinbild.quant import FORMATS, GGML_QUANTIZED, check_format, default_quantizable, estimate_bytes
from kleinbild.text_encoder import Qwen3TextEncoder, text_encoder_wanted_keys
from kleinbild.transformer import Flux2Transformer

GIB = 2**30
# Working memory in bf16 (see the module docstring): per token and unit of hidden size, per output pixel and
# decoder base channel.
TOKEN_BYTES = {"cuda": 44, "cpu": 80}
PIXEL_BYTES = {"cuda": 20, "cpu": 14}
_SIZES = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "F8_E4M3": 1,
          "F8_E5M2": 1, "BOOL": 1}
_KEEP = ("weight_scale", "weight_scale_2", "input_scale", "comfy_quant", "scale_weight", "scale_input")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of each component's weights, each stage's working memory, and the peaks they add up to."""

    model: str
    quant: str | None
    text_quant: str | None
    offload: str
    width: int
    height: int
    weights: dict[str, int]
    working: dict[str, int]  # on an accelerator
    peak_device: int  # device memory on an accelerator
    peak_host: int  # memory when the model runs on the CPU (its own working-memory coefficients)
    formats: dict[str, str | None] = field(default_factory=dict)
    working_host: dict[str, int] = field(default_factory=dict)  # on the CPU

    def summary(self) -> dict[str, Any]:
        gib = {k: round(v / GIB, 3) for k, v in {**self.weights, "total": sum(self.weights.values())}.items()}
        return {"model": self.model, "quant": self.quant, "text_quant": self.text_quant, "offload": self.offload,
                "size": f"{self.width}x{self.height}", "weights_gib": gib,
                "working_gib": {k: round(v / GIB, 3) for k, v in self.working.items()},
                "peak_device_gib": round(self.peak_device / GIB, 3), "peak_host_gib": round(self.peak_host / GIB, 3),
                "formats": self.formats}


def _meta(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return build()


def _stored(entries: dict[str, tuple[tuple[int, ...], str, int]], wanted: Callable[[str], bool], per: int) -> int:
    """Bytes of a file's wanted tensors once loaded: quantized and scale tensors as stored, floats at `per`."""
    total = 0
    for name, (shape, dtype, nbytes) in entries.items():
        if not wanted(name):
            continue
        n = math.prod(shape)
        quantized = dtype not in ("F32", "F16", "BF16", "F64") or name.rpartition(".")[2] in _KEEP
        total += nbytes if quantized else n * per
    return total


def _entries(paths: Sequence[Any], layout: str, rename: Callable[[str], str | None]
             ) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """(shape, stored type, stored bytes) of each tensor, from headers only."""
    if layout == "gguf":
        found = gguf_file.tensors(paths[0], rename=rename)
        return {k: (t.shape, t.type_name, t.nbytes + (4 if t.type_name not in ("F32", "F16", "BF16") else 0))
                for k, t in found.items()}
    out = {}
    for k, (shape, dtype) in read_header(paths).items():
        name = rename(k)
        if name is not None:
            out[name] = (tuple(shape), dtype, math.prod(shape) * _SIZES.get(dtype, 2))
    return out


def _quantized(entries: dict[str, tuple[tuple[int, ...], str, int]]) -> list[str]:
    return sorted({t for _, t, _ in entries.values() if t not in ("F32", "F16", "BF16", "F64", "I64", "I32")})


def _dit_weights(files: ModelFiles, quant: str | None, per: int, dtype: torch.dtype) -> tuple[int, str | None, int]:
    """(bytes, format, largest quantized layer's element count) of the transformer."""
    rename = strip_prefix if files.dit_layout != "diffusers" else (lambda k: k)
    entries = _entries(files.dit_files, files.dit_layout, rename)
    in_file = _quantized(entries)
    if in_file:
        return _stored(entries, lambda k: True, per), "+".join(in_file), _largest(files.preset)
    return _dit_estimate(files.preset, quant, dtype)


def _largest(preset: ModelPreset) -> int:
    dit = _meta(lambda: Flux2Transformer(preset.dit))
    return max((p.numel() for n, p in dit.named_parameters() if default_quantizable(n, tuple(p.shape))), default=0)


def _ggml_estimate(model: nn.Module, type_name: str, per: int) -> int:
    """Bytes of `model` as the GGUF converters write it: every 2-D weight whose rows split into blocks in
    `type_name`, the rest in the load dtype."""
    block, size = GGML_TYPES[type_name]
    total = 0
    for name, p in model.named_parameters():
        blocks = p.ndim == 2 and name.endswith(".weight") and p.shape[-1] % block == 0
        total += p.numel() // block * size if blocks else p.numel() * per
    return total


def _dit_estimate(preset: ModelPreset, quant: str | None, dtype: torch.dtype) -> tuple[int, str | None, int]:
    per = torch.empty((), dtype=dtype).element_size()
    dit = _meta(lambda: Flux2Transformer(preset.dit))
    if quant in GGML_QUANTIZED:
        return _ggml_estimate(dit, quant, per), quant, _largest(preset)
    return estimate_bytes(dit, quant, dtype), quant, _largest(preset) if quant else 0


def _text_estimate(preset: ModelPreset, text_quant: str | None, dtype: torch.dtype) -> int:
    per = torch.empty((), dtype=dtype).element_size()
    te = _meta(lambda: Qwen3TextEncoder(preset.text))
    if text_quant in GGML_QUANTIZED:
        return _ggml_estimate(te, text_quant, per)
    if text_quant is None:
        return estimate_bytes(te, None, dtype)
    linears = estimate_bytes(te, text_quant, dtype, which=text_quantizable)
    vocab, hidden = te.model.embed_tokens.weight.shape
    return linears - vocab * hidden * per + vocab * hidden + 4 * vocab  # the int8 table


def _text_weights(files: ModelFiles, text_quant: str | None, per: int, dtype: torch.dtype) -> tuple[int, str | None]:
    te = _meta(lambda: Qwen3TextEncoder(files.preset.text))
    wanted = text_encoder_wanted_keys(te.cfg)
    if files.text_layout == "gguf":
        entries = _entries(files.text_files, "gguf", gguf_file.text_name)
    else:
        entries = _entries(files.text_files, "hf", _hf_text_key)
    entries = {k: v for k, v in entries.items() if wanted(k)}
    in_file = _quantized(entries)
    if in_file:
        return _stored(entries, wanted, per), "+".join(in_file)
    return _text_estimate(files.preset, text_quant, dtype), text_quant


def _jit_extra(fmt: str | None, largest: int, device: torch.device) -> int:
    """A layer dequantized for one matmul: float32 and compute-dtype copies for GGUF, one copy for fp8 / nvfp4 where
    the device lacks their kernel; int8 always has one (CPU and CUDA)."""
    from kleinbild.quant import native_kernel

    if not fmt or not largest:
        return 0
    if fmt not in FORMATS:
        return 6 * largest
    return 0 if native_kernel(fmt, device) else 2 * largest


def plan(files: ModelFiles, *, quant: str | None = None, text_quant: str | None = None, offload: str = "none",
         width: int = 1024, height: int = 1024, dtype: torch.dtype = torch.bfloat16, source: str = "",
         device: str = "cuda") -> MemoryPlan:
    """The memory plan of one configuration of located files (see the module docstring)."""
    quant = None if quant is None else check_format(quant)
    text_quant = None if text_quant is None else check_format(text_quant)
    per = torch.empty((), dtype=dtype).element_size()
    dit_b, dit_fmt, largest = _dit_weights(files, quant, per, dtype)
    te_b, te_fmt = _text_weights(files, text_quant, per, dtype)
    return _assemble(files.preset, dit_b, te_b, {"transformer": dit_fmt, "text_encoder": te_fmt}, largest,
                     offload, width, height, dtype, device, source or str(files.dit_files[0]))


def plan_preset(preset: str, *, quant: str | None = None, text_quant: str | None = None, offload: str = "none",
                width: int = 1024, height: int = 1024, dtype: torch.dtype = torch.bfloat16,
                device: str = "cuda") -> MemoryPlan:
    """The plan of a preset's official shapes without any file: `quant` / `text_quant` may also name the GGML
    type of a GGUF build ("Q4_K", "Q8_0"), counted as the converters lay it out."""
    p = get_preset(preset)
    dit_b, dit_fmt, largest = _dit_estimate(p, quant, dtype)
    te_b = _text_estimate(p, text_quant, dtype)
    return _assemble(p, dit_b, te_b, {"transformer": dit_fmt, "text_encoder": text_quant}, largest, offload, width,
                     height, dtype, device, p.name)


def _working(p: ModelPreset, width: int, height: int, per: int, kind: str, jit: int) -> dict[str, int]:
    scale = per / 2
    tokens = (width // p.ae.downscale) * (height // p.ae.downscale) + p.text.max_length
    return {
        "text": int(p.text.max_length * p.text.hidden_size * TOKEN_BYTES[kind] * scale),
        "denoise": int(tokens * p.dit.hidden_size * TOKEN_BYTES[kind] * scale) + jit,
        "decode": int(width * height * (p.ae.decoder_ch or p.ae.ch) * PIXEL_BYTES[kind] * scale),
    }


def _block_share(p: ModelPreset) -> tuple[float, float]:
    """(share of the transformer's parameters in its blocks, share of the largest block)."""
    dit = _meta(lambda: Flux2Transformer(p.dit))
    total = sum(t.numel() for t in dit.parameters())
    blocks = [*dit.double_blocks, *dit.single_blocks]
    sizes = [sum(t.numel() for t in b.parameters()) for b in blocks]
    return sum(sizes) / total, max(sizes) / total


def _assemble(p: ModelPreset, dit_b: int, te_b: int, formats: dict[str, str | None], largest: int, offload: str,
              width: int, height: int, dtype: torch.dtype, device: str, source: str) -> MemoryPlan:
    per = torch.empty((), dtype=dtype).element_size()
    ae_b = sum(t.numel() for t in _meta(lambda: AutoEncoder(p.ae)).parameters()) * per
    weights = {"transformer": dit_b, "text_encoder": te_b, "autoencoder": ae_b}
    dev = _working(p, width, height, per, "cuda", _jit_extra(formats["transformer"], largest, torch.device(device)))
    cpu = _working(p, width, height, per, "cpu", _jit_extra(formats["transformer"], largest, torch.device("cpu")))
    stage_weights = {"text": te_b, "denoise": dit_b, "decode": ae_b}
    if offload == "none":
        device_peak = sum(weights.values()) + max(dev.values())
    elif offload == "model":
        device_peak = max(stage_weights[s] + dev[s] for s in dev)
    else:  # blocks and text-encoder layers visit one at a time; the rest of both stays on the device
        in_blocks, one_block = _block_share(p)
        embedding = _embedding_bytes(p, formats["text_encoder"], per)
        resident = int(dit_b * (1 - in_blocks)) + embedding
        layer = (te_b - embedding) // max(1, p.text.layers_to_run)
        device_peak = resident + max(int(dit_b * one_block) + dev["denoise"], ae_b + dev["decode"],
                                     layer + dev["text"])
    host_peak = sum(weights.values()) + max(cpu.values())
    if offload != "none":  # the text encoder exists only while encoding
        host_peak = dit_b + ae_b + max(te_b + cpu["text"], cpu["denoise"], cpu["decode"])
    q = formats["transformer"] if formats["transformer"] in FORMATS else None
    tq = formats["text_encoder"] if formats["text_encoder"] in FORMATS else None
    return MemoryPlan(source, q, tq, offload, width, height, weights, dev, device_peak, host_peak, formats, cpu)


def _embedding_bytes(p: ModelPreset, fmt: str | None, per: int) -> int:
    n = p.text.vocab_size * p.text.hidden_size
    if fmt is None:
        return n * per
    if fmt in GGML_QUANTIZED:
        block, size = GGML_TYPES[fmt]
        return n // block * size
    return n + 4 * p.text.vocab_size  # int8 rows, whatever the layers' format


# ---------------------------------------------------------------- fitting a budget

# Tried in order: full precision first, then moving components between stages, then the quantized formats.
CANDIDATES: tuple[tuple[str | None, str | None, str], ...] = (
    (None, None, "none"),
    (None, None, "model"),
    ("fp8", "int8", "none"),
    ("fp8", None, "model"),
    ("nvfp4", "int8", "none"),
    ("fp8", "int8", "model"),
    (None, None, "sequential"),
    ("fp8", "int8", "sequential"),
)


def fit_budget(model: str, options: LoadOptions, budget_gb: float, width: int, height: int,
               device: str = "cuda", offload: str | None = None) -> tuple[LoadOptions, MemoryPlan]:
    """The first candidate whose computed peak fits `budget_gb` of device memory (host memory on the CPU), keeping
    the formats `options` names and `offload` if given. Raises ValueError naming the smallest plan when none fits."""
    if budget_gb <= 0:
        raise ValueError(f"the memory budget must be positive, got {budget_gb} GiB")
    files = locate_with(model, options)
    on_cpu = device == "cpu"
    # A component whose file is already quantized (fp8, GGUF) loads as it is: no format is tried on it.
    as_is = plan(files, width=width, height=height, device=device).formats
    best: MemoryPlan | None = None
    seen = set()
    for quant, text_quant, mode in CANDIDATES:
        q = None if as_is["transformer"] else options.quant or quant
        tq = None if as_is["text_encoder"] else options.text_quant or text_quant
        off = offload or mode
        if (q, tq, off) in seen:
            continue
        seen.add((q, tq, off))
        p = plan(files, quant=q, text_quant=tq, offload=off, width=width, height=height, source=model, device=device)
        peak = p.peak_host if on_cpu else p.peak_device
        if peak <= budget_gb * GIB:
            return replace(options, quant=q, text_quant=tq, offload_mode=off), p
        if best is None or peak < (best.peak_host if on_cpu else best.peak_device):
            best = p
    assert best is not None
    need = (best.peak_host if on_cpu else best.peak_device) / GIB
    raise ValueError(f"{model} does not fit {budget_gb:g} GiB at {width}x{height}: the smallest plan (quant "
                     f"{best.quant}, text quant {best.text_quant}, offload {best.offload}) needs {need:.1f} GiB; use a "
                     "smaller size, a GGUF transformer, or more memory")


def describe(p: MemoryPlan, budget_gb: float | None = None) -> str:
    """One line saying what was chosen and why."""
    flags = " ".join(f"--{k} {v}" for k, v in (("quant", p.quant), ("text-quant", p.text_quant),
                                               ("offload", p.offload)) if v)
    head = f"memory budget {budget_gb:g} GiB: " if budget_gb is not None else ""
    return (f"{head}{flags or 'full precision, no offload'}; computed peak {p.peak_device / GIB:.1f} GiB on a GPU, "
            f"{p.peak_host / GIB:.1f} GiB on the CPU at {p.width}x{p.height}")


def format_table(plans: Sequence[MemoryPlan]) -> str:
    """A plain-text table of several plans."""
    rows = [("transformer", "text encoder", "offload", "DiT GiB", "text GiB", "AE GiB", "peak GPU GiB",
             "peak CPU GiB")]
    for p in plans:
        w = p.weights
        rows.append((p.formats.get("transformer") or "bf16", p.formats.get("text_encoder") or "bf16", p.offload,
                     *(f"{w[c] / GIB:.2f}" for c in ("transformer", "text_encoder", "autoencoder")),
                     f"{p.peak_device / GIB:.2f}", f"{p.peak_host / GIB:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)) for r in rows)


__all__ = ["CANDIDATES", "MemoryPlan", "describe", "fit_budget", "format_table", "plan", "plan_preset"]
