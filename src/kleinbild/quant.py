"""Quantized transformer weights: FP8, NVFP4 and int8, read from and written to the official single-file layout.

Formats (one linear layer `X`; every other tensor of the file stays as it is, usually bf16):

* **fp8**: `X.weight` float8_e4m3fn, `X.weight_scale` fp32 (per tensor; a per-row vector is also read), optional
  `X.input_scale` fp32; value = fp8 * weight_scale.
* **nvfp4**: `X.weight` uint8 (N, K/2), two FP4 E2M1 codes per byte, **the first of each pair in the high nibble**;
  `X.weight_scale` float8_e4m3fn, one per 16 consecutive weights along K, stored in cuBLAS' tiled block-scale layout
  (128x4 tiles, shape (roundup(N, 128), roundup(K/16, 4))); `X.weight_scale_2` fp32 per tensor; optional
  `X.input_scale` fp32; value = e2m1 * weight_scale * weight_scale_2. This is the layout of BFL's NVFP4 files (the
  ComfyUI / comfy-kitchen "TensorCoreNVFP4Layout"); in memory kleinbild keeps PyTorch's convention instead (first
  element in the low nibble, scales row-major (N, K/16)), which its Blackwell path hands to `torch._scaled_mm`.
* **int8** (kleinbild's own, per output channel): `X.weight` int8, `X.weight_scale` fp32 (N,); value = int8 * scale.

Each quantized layer also carries `X.comfy_quant`, a uint8 tensor holding JSON such as `{"format": "nvfp4"}`, which
is how ComfyUI-style files mark their quantized layers.

Compute: `QuantLinear` uses the hardware's own kernel where there is one (FP8 `_scaled_mm` on CUDA >= sm_89, NVFP4
`_scaled_mm` on sm_100+, int8 `_int_mm` with per-token int8 activations on CPU and CUDA); anywhere else it
dequantizes its weight just in time for the matmul and drops it afterwards, so weight memory stays at the quantized
size. A native kernel is checked once per process against the dequantized result and abandoned (with a warning) if
it disagrees.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kleinbild.files import release_file_pages
from kleinbild.ggml import GGML_TYPES
from kleinbild.ggml import dequantize as ggml_dequantize

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("fp8", "nvfp4", "int8")
# GGUF's block formats, read from files and dequantized just in time (kleinbild does not write them).
GGML_QUANTIZED = frozenset(GGML_TYPES) - {"F32", "F16", "BF16"}
FP8_MAX = 448.0
FP4_MAX = 6.0
BLOCK = 16  # NVFP4 weights per block scale

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring E2M1 magnitudes; a value on one rounds to the even code (round half to even).
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


# ---------------------------------------------------------------- E2M1 and nibble packing


def e2m1_decode(codes: Tensor) -> Tensor:
    """4-bit E2M1 codes (uint8 0..15: sign bit 3, exponent bits 2-1, mantissa bit 0) -> float32 values."""
    lut = torch.tensor(_E2M1 + tuple(-v for v in _E2M1), dtype=torch.float32, device=codes.device)
    return lut[codes.long()]


def e2m1_encode(x: Tensor) -> Tensor:
    """Round to the nearest E2M1 value (ties to the even code, magnitudes above 6 saturate) -> uint8 codes 0..15."""
    a = x.float().abs().clamp(max=FP4_MAX)
    mids = torch.tensor(_E2M1_MIDPOINTS, dtype=torch.float32, device=x.device)
    code = torch.bucketize(a, mids, right=True)  # ties land on the upper code here ...
    below = (code - 1).clamp(min=0)
    tie = (code > 0) & (a == mids[below]) & (below % 2 == 0)  # ... and go back down where the lower code is even
    code = code - tie.long()
    return (code | (torch.signbit(x).long() << 3)).to(torch.uint8)


def pack_fp4(codes: Tensor, hi_first: bool = False) -> Tensor:
    """(..., K) codes -> (..., K/2) bytes. hi_first: element 2i in the high nibble (BFL/ComfyUI files); otherwise in
    the low nibble (PyTorch's float4_e2m1fn_x2)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even last dimension, got {tuple(codes.shape)}")
    even, odd = codes[..., 0::2].to(torch.uint8), codes[..., 1::2].to(torch.uint8)
    return (even << 4 | odd) if hi_first else (odd << 4 | even)


def unpack_fp4(packed: Tensor, hi_first: bool = False) -> Tensor:
    """The inverse of `pack_fp4`: (..., K/2) bytes -> (..., K) codes."""
    hi, lo = packed >> 4, packed & 0x0F
    first, second = (hi, lo) if hi_first else (lo, hi)
    return torch.stack([first, second], dim=-1).flatten(-2)


def swap_nibbles(packed: Tensor) -> Tensor:
    """Converts between the two nibble orders."""
    return (packed << 4) | (packed >> 4)


def _roundup(n: int, m: int) -> int:
    return -(-n // m) * m


def swizzle_block_scales(scales: Tensor) -> Tensor:
    """Row-major (R, C) block scales -> cuBLAS' tiled layout, shape (roundup(R, 128), roundup(C, 4)), zero padded.

    Scale (r, c) lands at flat position ((r // 128 * C4 + c // 4) * 32 + r % 32) * 16 + (r % 128 // 32) * 4 + c % 4,
    with C4 = roundup(C, 4) / 4 (the "128x4 -> 32x16" layout of the cuBLAS block-scaling docs).
    """
    r, c = scales.shape
    rp, cp = _roundup(r, 128), _roundup(c, 4)
    raw = scales.view(torch.uint8) if scales.dtype == torch.float8_e4m3fn else scales
    pad = torch.zeros((rp, cp), dtype=raw.dtype, device=raw.device)
    pad[:r, :c] = raw
    tiles = pad.view(rp // 128, 128, cp // 4, 4).permute(0, 2, 1, 3)
    out = tiles.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(rp, cp)
    return out.view(scales.dtype) if scales.dtype == torch.float8_e4m3fn else out


def unswizzle_block_scales(tiled: Tensor, rows: int, cols: int) -> Tensor:
    """The inverse of `swizzle_block_scales`, cropped to (rows, cols)."""
    rp, cp = tiled.shape
    if rp % 128 or cp % 4 or rp < rows or cp < cols:
        raise ValueError(f"block scales of shape {(rp, cp)} are not a tiled layout for {rows}x{cols} scales")
    raw = tiled.view(torch.uint8) if tiled.dtype == torch.float8_e4m3fn else tiled
    x = raw.reshape(-1, 32, 4, 4).transpose(1, 2).reshape(rp // 128, cp // 4, 128, 4).permute(0, 2, 1, 3)
    out = x.reshape(rp, cp)[:rows, :cols].contiguous()
    return out.view(tiled.dtype) if tiled.dtype == torch.float8_e4m3fn else out


# ---------------------------------------------------------------- quantized weights


@dataclass
class QuantWeight:
    """One quantized (N, K) weight in kleinbild's in-memory convention.

    fp8: data float8_e4m3fn (N, K), scale fp32 () or (N,). nvfp4: data uint8 (N, K/2) low nibble first, block_scale
    float8_e4m3fn (N, K/16) row-major, scale fp32 (). int8: data int8 (N, K), scale fp32 (N,).
    """

    format: str
    shape: tuple[int, int]
    data: Tensor
    scale: Tensor
    block_scale: Tensor | None = None
    input_scale: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.data, self.scale, self.block_scale, self.input_scale) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str) -> QuantWeight:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return QuantWeight(self.format, self.shape, mv(self.data), mv(self.scale), mv(self.block_scale),
                           mv(self.input_scale), dict(self.extra))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        n, k = self.shape
        if self.format in GGML_QUANTIZED:
            return ggml_dequantize(self.data, self.format, self.shape, dtype)
        if self.format == "fp8":
            s = self.scale.float()
            w = self.data.float() * (s[:, None] if s.ndim == 1 else s)
        elif self.format == "int8":
            w = self.data.float() * self.scale.float()[:, None]
        elif self.format == "nvfp4":
            assert self.block_scale is not None
            vals = e2m1_decode(unpack_fp4(self.data)).view(n, k // BLOCK, BLOCK)
            total = self.block_scale.float() * self.scale.float()
            w = (vals * total[..., None]).view(n, k)
        else:
            raise ValueError(f"unknown quantization format {self.format!r}")
        return w.to(dtype)


def check_format(fmt: str) -> str:
    f = str(fmt).strip().lower()
    if f not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return f


def quantize_weight(w: Tensor, fmt: str) -> QuantWeight:
    """Quantize one (N, K) weight. Computed in float32 on w's device."""
    fmt = check_format(fmt)
    if w.ndim != 2:
        raise ValueError(f"only 2-D (linear) weights are quantized, got shape {tuple(w.shape)}")
    n, k = w.shape
    if fmt == "int8":
        data = torch.empty((n, k), dtype=torch.int8, device=w.device)
        s = torch.empty(n, dtype=torch.float32, device=w.device)
        rows = max(1, (1 << 18) // k)  # row blocks of ~1 MB in float32 stay in cache: same values, faster
        for r in range(0, n, rows):
            wf = w[r : r + rows].detach().float()
            amax = wf.abs().amax(dim=1)
            sb = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
            data[r : r + rows] = torch.round(wf / sb[:, None]).clamp(-127, 127)
            s[r : r + rows] = sb
        return QuantWeight("int8", (n, k), data, s)
    wf = w.detach().float()
    if fmt == "fp8":
        amax = wf.abs().max()
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        data = (wf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return QuantWeight("fp8", (n, k), data, s.reshape(()))
    if k % BLOCK:
        raise ValueError(f"NVFP4 needs the input dimension to be a multiple of {BLOCK}, got {k}")
    amax = wf.abs().max()
    g = torch.where(amax > 0, amax / (FP8_MAX * FP4_MAX), torch.ones_like(amax))
    blocks = wf.view(n, k // BLOCK, BLOCK)
    bscale = (blocks.abs().amax(dim=-1) / FP4_MAX / g).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    total = bscale.float() * g
    scaled = blocks / torch.where(total > 0, total, torch.ones_like(total))[..., None]
    codes = e2m1_encode(scaled.clamp(-FP4_MAX, FP4_MAX)).view(n, k)
    return QuantWeight("nvfp4", (n, k), pack_fp4(codes), g.reshape(()), bscale)


# ---------------------------------------------------------------- the layer


_NATIVE_ENABLED = {f: os.environ.get("KLEINBILD_QUANT_NATIVE", "1") not in ("0", "false", "no") for f in FORMATS}
_NATIVE_VERIFIED: dict[tuple[str, str], bool] = {}
# Relative error (L2) a native kernel may show against the dequantized matmul before it is abandoned: it also
# quantizes the activations (8 bits, or 4 bits for NVFP4), which a wrong layout would exceed many times over.
_NATIVE_TOLERANCE = {"fp8": 0.08, "int8": 0.08, "nvfp4": 0.35}
# CPU int8 blocks (rows of activations per _int_mm, rows per rescale): measured best on 2 cores at klein-4b sizes.
_INT8_ROWS, _INT8_SUB = 512, 64


_FP8_EMULATED = False


def emulate_fp8_compute(enabled: bool) -> None:
    """Where no FP8 kernel exists (a CPU), run fp8 layers as the kernel would: activations rounded to float8 with
    one scale, times the fp8 weight, summed in float32. Slow; it is how FP8 compute's effect on images is measured
    without a GPU (`kleinbild quantize --quality`). Off by default: those layers then dequantize the weight and
    keep the activations as they are."""
    global _FP8_EMULATED
    _FP8_EMULATED = bool(enabled)


def set_native(fmt: str, enabled: bool) -> None:
    """Allow or forbid a format's native kernel (then its layers always dequantize just in time)."""
    _NATIVE_ENABLED[check_format(fmt)] = bool(enabled)


def native_kernel(fmt: str, device: torch.device) -> str | None:
    """Which native kernel a format would use on `device`, or None (dequantize just in time)."""
    if not _NATIVE_ENABLED.get(fmt, False):
        return None
    if fmt == "int8" and device.type in ("cpu", "cuda") and hasattr(torch, "_int_mm"):
        return "int8 _int_mm (per-token int8 activations)"
    if device.type == "cuda" and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability(device)
        if fmt == "fp8" and cap >= (8, 9) and hasattr(torch, "_scaled_mm"):
            return "fp8 _scaled_mm (per-tensor fp8 activations)"
        if fmt == "nvfp4" and cap >= (10, 0) and hasattr(torch, "float4_e2m1fn_x2"):
            return "nvfp4 _scaled_mm (nvfp4 activations)"
    if fmt == "fp8" and _FP8_EMULATED:
        return "fp8 activations, emulated in float32"
    return None


class QuantLinear(nn.Module):
    """A bias-free linear layer with a quantized weight. Its tensors are non-persistent buffers, so the strict loader
    sees only the model's other tensors."""

    def __init__(self, qw: QuantWeight):
        super().__init__()
        self.format = qw.format
        self.out_features, self.in_features = qw.shape
        self.extra = dict(qw.extra)
        self.register_buffer("qdata", qw.data, persistent=False)
        self.register_buffer("qscale", qw.scale, persistent=False)
        self.register_buffer("qblock", qw.block_scale, persistent=False)
        self.register_buffer("qinput", qw.input_scale, persistent=False)
        self._swizzled: Tensor | None = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, format={self.format}"

    def quant_weight(self) -> QuantWeight:
        return QuantWeight(self.format, (self.out_features, self.in_features), self.qdata, self.qscale, self.qblock,
                           self.qinput, dict(self.extra))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.quant_weight().dequantize(dtype)

    def forward(self, x: Tensor) -> Tensor:
        kernel = native_kernel(self.format, x.device)
        if kernel is not None and x.numel() > 0:
            key = (self.format, str(x.device))
            ok = _NATIVE_VERIFIED.get(key)
            if ok is None:
                ok = self._verify_native(x, key, kernel)
            if ok:
                try:
                    return self._native(x)
                except (RuntimeError, TypeError, ValueError) as e:  # a shape the kernel does not take: fall back
                    log.debug("native %s kernel declined %s: %s", self.format, tuple(x.shape), e)
        return self._just_in_time(x)

    def _just_in_time(self, x: Tensor) -> Tensor:
        """Matmul with the weight dequantized for this call only.

        In bf16/fp32 the per-tensor (or per-row) scale is applied to the output instead of the weight: fp8 and int8
        codes, and e2m1 x fp8 block-scale products (at most 6 significant bits), are exact in bf16, so the only
        rounding is the matmul's own. fp16 could overflow without the scale, so it gets the scaled weight.
        """
        if x.dtype not in (torch.bfloat16, torch.float32) or self.format in GGML_QUANTIZED:
            return F.linear(x, self.dequantize(x.dtype))
        if self.format == "nvfp4":
            assert self.qblock is not None
            n, k = self.out_features, self.in_features
            vals = F.embedding(self.qdata.int(), _byte_lut(x.device, x.dtype)).view(n, k // BLOCK, BLOCK)
            w = (vals * self.qblock.to(x.dtype)[..., None]).view(n, k)
        else:
            w = self.qdata.to(x.dtype)
        y = F.linear(x, w).float()
        s = self.qscale.float()
        return (y * s).to(x.dtype)

    def _verify_native(self, x: Tensor, key: tuple[str, str], kernel: str) -> bool:
        """Compare the native kernel with the dequantized matmul once per process, format and device."""
        try:
            got = self._native(x).float()
        except (RuntimeError, TypeError, ValueError) as e:
            log.warning("%s: native kernel unavailable (%s); dequantizing instead", kernel, e)
            _NATIVE_VERIFIED[key] = False
            return False
        want = F.linear(x.float(), self.dequantize(torch.float32))
        err = float((got - want).norm() / want.norm().clamp_min(1e-12))
        ok = math.isfinite(err) and err < _NATIVE_TOLERANCE[self.format]
        if ok:
            log.info("%s verified against the dequantized matmul (relative error %.4f)", kernel, err)
        else:
            log.warning("%s disagrees with the dequantized matmul (relative error %.3g); dequantizing instead",
                        kernel, err)
        _NATIVE_VERIFIED[key] = ok
        return ok

    def _native(self, x: Tensor) -> Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if self.format == "int8":
            return self._native_int8(x2).reshape(*lead, self.out_features)
        if self.format == "fp8":
            sw = self.qscale.float()
            if sw.ndim:
                raise ValueError("per-row fp8 weight scales take the dequantize path")
            xq, sx = self.fp8_activations(x2)
            if x2.device.type == "cuda":
                y = torch._scaled_mm(xq, self.qdata.t(), scale_a=sx, scale_b=sw.reshape(()), out_dtype=torch.float32)
            else:  # emulate_fp8_compute: the kernel's arithmetic (its float32 sums may run in another order)
                y = F.linear(xq.float(), self.qdata.float()) * (sx * sw)
        else:
            y = self._native_nvfp4(x2)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def fp8_activations(self, x2: Tensor) -> tuple[Tensor, Tensor]:
        """x2 rounded to float8 codes, and their one scale: the layer's `input_scale` when it has one (from the file,
        or `kleinbild.quantize.calibrate_input_scales`: no reduction over x2 on every call, and a value that does not
        depend on the batch; values beyond the calibrated range saturate), else x2's absolute maximum / 448."""
        if self.qinput is not None:
            sx = self.qinput.float().reshape(())
        else:  # max |x| read once in x's own dtype (exact), not through a float32 copy of |x|
            sx = (torch.linalg.vector_norm(x2, float("inf")).float().clamp_min(1e-12) / FP8_MAX).reshape(())
        # One float32 copy, scaled and clipped in place: three passes over it where an eager chain of new tensors
        # makes five (the values are the same).
        xq = x2.to(torch.float32, copy=True).div_(sx).clamp_(-FP8_MAX, FP8_MAX)
        return xq.to(torch.float8_e4m3fn), sx

    def _native_int8(self, x2: Tensor) -> Tensor:
        """Per-token int8 activations times the int8 weight, rescaled per token and per output channel.

        On CPU the rows go in blocks: quantizing a block, its int32 product and the rescale all stay in cache, which
        makes the layer take ~0.56 of the bf16 matmul's time instead of ~0.96 unblocked (klein-4b sizes, 2 cores):
        the unblocked rescale alone, three passes over an (M, N) float32 tensor in memory, cost half the matmul.
        """
        m = x2.shape[0]
        out = torch.empty((m, self.out_features), dtype=x2.dtype, device=x2.device)
        ws = self.qscale.float()[None, :]
        cpu = x2.device.type == "cpu"
        rows, sub = (_INT8_ROWS, _INT8_SUB) if cpu else (m, m)
        for i in range(0, m, rows):
            xc = x2[i : i + rows]
            sx = xc.abs().amax(dim=1, keepdim=True).float().clamp_min_(1e-12).div_(127.0)
            xq = xc.to(torch.float32, copy=True).mul_(1.0 / sx).round_().to(torch.int8)
            y = torch._int_mm(xq, self.qdata.t())
            for j in range(0, y.shape[0], sub):
                k = min(sub, y.shape[0] - j)  # the last piece of a chunk is short: its out slice must be too
                torch.mul(y[j : j + k].float().mul_(sx[j : j + k]), ws, out=out[i + j : i + j + k])
        return out

    def _native_nvfp4(self, x2: Tensor) -> Tensor:
        assert self.qblock is not None
        xq = quantize_weight(x2, "nvfp4")
        assert xq.block_scale is not None
        if self._swizzled is None:
            self._swizzled = swizzle_block_scales(self.qblock).flatten()
        y = torch._scaled_mm(
            xq.data.view(torch.float4_e2m1fn_x2),
            self.qdata.view(torch.float4_e2m1fn_x2).t(),
            scale_a=swizzle_block_scales(xq.block_scale).flatten(),
            scale_b=self._swizzled,
            out_dtype=torch.float32,
        )
        return y * (xq.scale.float() * self.qscale.float())


class QuantEmbedding(nn.Module):
    """An embedding table kept quantized: a lookup dequantizes only the rows it reads, which every format allows
    (per-row scales, blocks within a row, or one scale for the whole table). Returns float32; the caller casts."""

    def __init__(self, qw: QuantWeight):
        super().__init__()
        self.format = qw.format
        self.num_embeddings, self.embedding_dim = qw.shape
        self.register_buffer("qdata", qw.data, persistent=False)
        self.register_buffer("qscale", qw.scale, persistent=False)
        self.register_buffer("qblock", qw.block_scale, persistent=False)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.format}"

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1).to(self.qdata.device)
        scale = self.qscale if self.qscale.ndim == 0 else self.qscale[flat]
        block = None if self.qblock is None else self.qblock[flat]
        rows = QuantWeight(self.format, (flat.numel(), self.embedding_dim), self.qdata[flat], scale, block)
        return rows.dequantize(torch.float32).view(*ids.shape, self.embedding_dim)


_BYTE_LUTS: dict[tuple[str, torch.dtype], Tensor] = {}


def _byte_lut(device: torch.device, dtype: torch.dtype) -> Tensor:
    """(256, 2): the two E2M1 values of each byte, low nibble first (kleinbild's in-memory order)."""
    key = (str(device), dtype)
    if key not in _BYTE_LUTS:
        b = torch.arange(256)
        _BYTE_LUTS[key] = torch.stack([e2m1_decode(b & 15), e2m1_decode(b >> 4)], dim=-1).to(device, dtype)
    return _BYTE_LUTS[key]


# ---------------------------------------------------------------- which layers, and whole models


def default_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """The layers BFL's quantized files quantize: the blocks' linears (qkv, proj, MLP, linear1/2), except the attention
    output projections of double block 0. Embeddings, modulations and the final layer stay in the model dtype."""
    if len(shape) != 2 or not name.endswith(".weight"):
        return False
    m = re.match(r"(double_blocks|single_blocks)\.(\d+)\.(.+)\.weight$", name)
    if not m:
        return False
    kind, idx, rest = m.groups()
    if kind == "single_blocks":
        return rest in ("linear1", "linear2")
    if rest in ("img_attn.proj", "txt_attn.proj") and idx == "0":
        return False
    return rest in ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                    "txt_mlp.0", "txt_mlp.2")


def quantize_state(
    state: dict[str, Tensor],
    fmt: str,
    device: torch.device | str | None = None,
    which: Callable[[str, tuple[int, ...]], bool] = default_quantizable,
) -> dict[str, QuantWeight]:
    """Quantize the selected weights of an official-named state dict in place: each quantized weight is popped from
    `state` (so its full-precision copy can be freed) and returned under its module name. Work happens on `device`
    (default: where the tensor is), one layer at a time."""
    fmt = check_format(fmt)
    out: dict[str, QuantWeight] = {}
    for key in [k for k in state if which(k, tuple(state[k].shape))]:
        w = state[key]
        if fmt == "nvfp4" and (w.shape[1] % BLOCK or w.shape[0] % BLOCK):
            continue  # not block-aligned: stays full precision, as in the official files
        w = state.pop(key)
        out[key.removesuffix(".weight")] = quantize_weight(w.to(device) if device is not None else w, fmt)
        release_file_pages([w])  # the mapped full-precision pages are not read again: keep only the quantized copy
    return out


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    (root.get_submodule(parent) if parent else root)._modules[leaf] = module


def _layer_problem(model: nn.Module, name: str, qw: QuantWeight) -> str | None:
    try:
        old = model.get_submodule(name)
    except AttributeError:
        return f"{name}: no such layer in the model"
    if isinstance(old, nn.Embedding):
        shape = (old.num_embeddings, old.embedding_dim)
    elif isinstance(old, nn.Linear) and old.bias is None:
        shape = (old.out_features, old.in_features)
    else:
        return f"{name}: is a {type(old).__name__}, not a bias-free linear layer or an embedding"
    return None if shape == qw.shape else f"{name}: quantized weight {qw.shape} vs model {shape}"


def install(model: nn.Module, layers: Mapping[str, QuantWeight], device: torch.device | str) -> None:
    """Replace each named nn.Linear (nn.Embedding) of `model`, meta-built or real, by a QuantLinear (QuantEmbedding)
    holding its quantized weight."""
    problems = [p for name, qw in layers.items() if (p := _layer_problem(model, name, qw))]
    if problems:
        raise ValueError("quantized layers do not match the model: " + "; ".join(problems[:8]))
    for name, qw in layers.items():
        embedding = isinstance(model.get_submodule(name), nn.Embedding)
        _set_module(model, name, (QuantEmbedding if embedding else QuantLinear)(qw.to(device)))


def quantize_model(model: nn.Module, fmt: str,
                   which: Callable[[str, tuple[int, ...]], bool] = default_quantizable) -> int:
    """Quantize a loaded model's selected linear layers in place; returns how many were quantized."""
    fmt = check_format(fmt)
    n = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and mod.bias is None and which(name + ".weight", tuple(mod.weight.shape)):
            if fmt == "nvfp4" and (mod.in_features % BLOCK or mod.out_features % BLOCK):
                continue
            _set_module(model, name, QuantLinear(quantize_weight(mod.weight, fmt)))
            n += 1
    return n


def estimate_bytes(model: nn.Module, fmt: str | None, dtype: torch.dtype = torch.bfloat16,
                   which: Callable[[str, tuple[int, ...]], bool] = default_quantizable) -> int:
    """Weight bytes `model` (meta-built is fine) would hold with its selected linears in `fmt` (None: none), the rest
    in `dtype`: the arithmetic behind the measured numbers, for architectures too big to build here."""
    per = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        n, k = (shape + (0, 0))[:2]
        if fmt is None or not which(name, shape) or (fmt == "nvfp4" and (n % BLOCK or k % BLOCK)):
            total += p.numel() * per
        elif fmt == "fp8":
            total += n * k + 4
        elif fmt == "int8":
            total += n * k + 4 * n
        else:
            total += n * k // 2 + n * k // BLOCK + 4
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (quantized ones included) the model holds."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def quant_summary(model: nn.Module) -> dict[str, int]:
    """How many layers of each format a model holds."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            out[m.format] = out.get(m.format, 0) + 1
    return out
