"""Dequantize GGML block formats (the tensor encodings of GGUF files) with vectorised torch ops, on any device.

A tensor's last dimension is cut into blocks of ``block_size`` elements, each stored as ``type_size`` bytes; rows
are blocks back to back with no padding. Multi-byte fields are little-endian and ``d``, ``dmin``, ``m`` are fp16.

Legacy formats, 32 elements a block (nibble j of ``qs`` is element j for the low, j + 16 for the high nibble; the
fifth bit of element j is bit j of the 32-bit ``qh``):

    Q8_0  d, qs[32] int8                        x = qs * d
    Q4_0  d, qs[16]                             x = d * (q - 8)
    Q4_1  d, m, qs[16]                          x = d * q + m
    Q5_0  d, qh[4], qs[16]                      x = d * (q - 16)
    Q5_1  d, m, qh[4], qs[16]                   x = d * q + m

K-quants, 256 elements a super-block of sub-blocks that each carry a small integer scale (and, for the affine ones,
a min) relative to the super-block's fp16 ``d`` (and ``dmin``):

    Q2_K  scales[16], qs[64], d, dmin           16 x 16, scale byte = sc | mn << 4, x = (d*sc) * q - (dmin*mn)
    Q3_K  hmask[32], qs[64], scales[12], d      16 x 16, 6-bit scales - 32, q = 2 bits - (4 if the hmask bit is 0)
    Q4_K  d, dmin, scales[12], qs[128]          8 x 32, 6-bit sc and mn packed in 12 bytes, x = (d*sc) * q - (dmin*mn)
    Q5_K  d, dmin, scales[12], qh[32], qs[128]  as Q4_K with a fifth bit from qh
    Q6_K  ql[128], qh[64], scales[16] int8, d   16 x 16, q = (4 bits of ql | 2 bits of qh << 4) - 32, x = (d*sc) * q

In K-quants, sub-bit fields are planes: in a group of 32 (or 64) bytes, bits 0-1 (or 0-3) of every byte hold the
next 32 (or 64) elements, bits 2-3 the 32 after those, and so on; the sub-block order follows.

Results in float32 are bit-identical to ``gguf.quants.dequantize`` (the reference in the gguf package). We follow its
order of operations, though it matters less than it seems: an fp16 scale has 11 significant bits, and times a
sub-block scale and a quant it never needs more than float32's 24, so every product is exact. Only the affine
formats' final add of the min rounds, once, here as there. (fp16 NaN payloads are the exception: torch widens them to
a canonical NaN, numpy keeps the payload.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

GGML_TYPES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}

_FLOATS: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _f16(fields: Tensor) -> Tensor:
    """Bytes [..., 2k] -> float32 [..., k]; the copy makes a sliced field viewable as fp16."""
    return fields.contiguous().view(torch.float16).float()


def _planes(x: Tensor, width: int) -> Tensor:
    """Split every byte into its 8 // width bit fields, lowest first, stacked on a new dimension -2."""
    mask = (1 << width) - 1
    return torch.stack([(x >> shift) & mask for shift in range(0, 8, width)], dim=-2)


def _high_bits(qh: Tensor) -> Tensor:
    """The 32 fifth bits of a legacy block, [n, 4] bytes -> [n, 32]: bit i of the little-endian uint32 is element i."""
    return _planes(qh.unsqueeze(-1), 1).reshape(qh.shape[0], 32)


def _nibbles(qs: Tensor) -> Tensor:
    """[n, 16] -> [n, 32] in legacy order: the low nibbles are elements 0-15, the high nibbles 16-31."""
    return _planes(qs, 4).reshape(qs.shape[0], 32)


def _q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b[:, :2]))


def _q4_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 2:]).view(torch.int8) - 8
    return q.float().mul_(_f16(b[:, :2]))


def _q4_1(b: Tensor) -> Tensor:
    return _nibbles(b[:, 4:]).float().mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _q5_0(b: Tensor) -> Tensor:
    q = (_nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)).view(torch.int8) - 16
    return q.float().mul_(_f16(b[:, :2]))


def _q5_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return q.float().mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).float()).unsqueeze(-1)
    ml = (dmin * (scales >> 4).float()).unsqueeze(-1)
    q = _planes(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16)
    return q.float().mul_(dl).sub_(ml).reshape(n, 256)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    hmask, qs, packed, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    # 16 six-bit scales: low nibbles from bytes 0-7 (both halves), high two bits from bytes 8-11 (four planes).
    low = _planes(packed[:, :8], 4).reshape(n, 16)
    high = _planes(packed[:, 8:], 2).reshape(n, 16)
    scales = ((low | (high << 4)).view(torch.int8) - 32).float()
    dl = (d * scales).unsqueeze(-1)
    ql = _planes(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16)
    # A set hmask bit means no offset; a clear one subtracts 4.
    offset = (_planes(hmask, 1).reshape(n, 16, 16) ^ 1) << 2
    q = ql.view(torch.int8) - offset.view(torch.int8)
    return q.float().mul_(dl).reshape(n, 256)


def _k_scale_min(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins, as float32 [n, 8].

    Bytes 0-3 hold scales 0-3 (low 6 bits), 4-7 mins 0-3; scales and mins 4-7 take their low nibble from bytes
    8-11 (low and high nibble respectively) and their top two bits from the spare top bits of bytes 0-3 / 4-7.
    """
    n = packed.shape[0]
    sc_lo, mn_lo, rest = packed.reshape(n, 3, 4).unbind(1)
    sc = torch.cat([sc_lo & 0x3F, (rest & 0x0F) | ((sc_lo >> 2) & 0x30)], dim=-1)
    mn = torch.cat([mn_lo & 0x3F, (rest >> 4) | ((mn_lo >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _k_affine(b: Tensor, q: Tensor) -> Tensor:
    """Q4_K/Q5_K: x = (d*sc) * q - (dmin*mn) over 8 sub-blocks of 32; q is [n, 8, 32]."""
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (_f16(b[:, :2]) * sc).unsqueeze(-1)
    ml = (_f16(b[:, 2:4]) * mn).unsqueeze(-1)
    return q.float().mul_(dl).sub_(ml).reshape(b.shape[0], 256)


def _q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    return _k_affine(b, _planes(b[:, 16:].reshape(n, 4, 32), 4).reshape(n, 8, 32))


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    low = _planes(b[:, 48:].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    return _k_affine(b, low | (_planes(b[:, 16:48], 1) << 4))


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    dl = (d * scales.view(torch.int8).float()).unsqueeze(-1)
    low = _planes(ql.reshape(n, 2, 64), 4).reshape(n, 8, 32)
    high = _planes(qh.reshape(n, 2, 32), 2).reshape(n, 8, 32)
    q = (low | (high << 4)).view(torch.int8) - 32
    return q.reshape(n, 16, 16).float().mul_(dl).reshape(n, 256)


_BLOCK_DECODERS: dict[str, Callable[[Tensor], Tensor]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def _sizes(type_name: str) -> tuple[int, int]:
    try:
        return GGML_TYPES[type_name]
    except KeyError:
        raise ValueError(f"unknown GGML type {type_name!r}; supported: {', '.join(GGML_TYPES)}") from None


def quantized_nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of ``shape`` (torch order, blocks along the last dimension) occupies in ``type_name``."""
    block_size, type_size = _sizes(type_name)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    last = shape[-1] if shape else 1
    if last % block_size:
        raise ValueError(
            f"{type_name} needs the last dimension to be a multiple of its block size {block_size}; shape {shape}"
        )
    return math.prod(shape) // block_size * type_size


def dequantize(raw: Tensor, type_name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """Decode a GGML tensor's bytes, exactly as stored in a GGUF file, into a ``dtype`` tensor of ``shape``.

    ``raw`` is a uint8 tensor of any shape on any device; ``shape`` is in torch order (GGUF's ``ne`` reversed).
    Float types are reinterpreted in place, so the result may share memory with ``raw``.
    """
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw must be a uint8 tensor, got {raw.dtype}")
    shape = tuple(int(s) for s in shape)
    nbytes = quantized_nbytes(type_name, shape)
    if raw.numel() != nbytes:
        raise ValueError(f"{type_name} tensor of shape {shape} needs {nbytes} bytes, got {raw.numel()}")
    flat = raw.reshape(-1)
    # Reinterpreting bytes as 2- or 4-byte values needs an aligned start, which a slice of a file may lack.
    if flat.storage_offset() % 4:
        flat = flat.clone()
    if type_name in _FLOATS:
        return flat.view(_FLOATS[type_name]).reshape(shape).to(dtype)
    type_size = GGML_TYPES[type_name][1]
    blocks = _BLOCK_DECODERS[type_name](flat.reshape(-1, type_size))
    return blocks.reshape(shape).to(dtype)
