"""GGML dequantization: bit-exact against the gguf package's numpy reference for every supported type, output
dtypes, byte sizes, odd inputs (unaligned, any byte shape, other devices) and the error messages."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quant_shape_to_byte_shape
from gguf.quants import quantize as gguf_quantize

from kleinbild import ggml
from kleinbild.ggml import GGML_TYPES, dequantize, quantized_nbytes

TYPES = list(GGML_TYPES)
# Types gguf.quants can quantize; the K-quants it can only dequantize.
GGUF_QUANTIZABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
# Byte offsets of the fp16 fields (d, dmin, m) in a block, written down here independently of the module.
F16_FIELDS = {
    "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}


def _shapes(type_name: str) -> list[tuple[int, ...]]:
    block = GGML_TYPES[type_name][0]
    return [(3, 256), (2, 512), (2, 3, max(block, 32)), (block * 4,)]


def _random_bytes(type_name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random blocks in the byte shape gguf uses, with finite (possibly subnormal or huge) fp16 scale fields."""
    rng = np.random.default_rng(seed)
    qtype = GGMLQuantizationType[type_name]
    raw = rng.integers(0, 256, size=quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
    blocks = raw.reshape(-1, GGML_TYPES[type_name][1])
    for offset in F16_FIELDS.get(type_name, []):
        bits = rng.integers(0, 1 << 16, size=blocks.shape[0], dtype=np.uint16)
        # An all-ones exponent is Inf/NaN; clearing its top bit keeps the value finite.
        bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0xBFFF, bits).astype(np.uint16)
        blocks[:, offset : offset + 2] = bits.view(np.uint8).reshape(-1, 2)
    return raw


def _quantized_bytes(type_name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    qtype = GGMLQuantizationType[type_name]
    data = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    out = np.ascontiguousarray(gguf_quantize(data, qtype))
    return out.view(np.uint8).reshape(quant_shape_to_byte_shape(shape, qtype))


def _reference(raw: np.ndarray, type_name: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, GGMLQuantizationType[type_name])))


def _assert_bits_equal(out: torch.Tensor, ref: torch.Tensor, nan_ok: bool = False) -> None:
    assert out.dtype == ref.dtype == torch.float32 and out.shape == ref.shape
    if nan_ok:
        # torch canonicalises NaN payloads when widening fp16, numpy keeps them; a NaN is still a NaN.
        both_nan = out.isnan() & ref.isnan()
        out, ref = out.masked_fill(both_nan, 0.0), ref.masked_fill(both_nan, 0.0)
    mismatched = (out.view(torch.int32) != ref.view(torch.int32)).sum().item()
    assert mismatched == 0, f"{mismatched} of {out.numel()} values differ in their bits"


# ---------------------------------------------------------------- sizes


def test_sizes_match_gguf():
    assert GGML_TYPES == {name: GGML_QUANT_SIZES[GGMLQuantizationType[name]] for name in TYPES}


@pytest.mark.parametrize("type_name", TYPES)
def test_quantized_nbytes_matches_gguf(type_name):
    for shape in _shapes(type_name):
        byte_shape = quant_shape_to_byte_shape(shape, GGMLQuantizationType[type_name])
        assert quantized_nbytes(type_name, shape) == int(np.prod(byte_shape))


# ---------------------------------------------------------------- bit-exact against gguf.quants


@pytest.mark.parametrize("type_name", TYPES)
def test_random_blocks_bit_exact(type_name):
    for seed, shape in enumerate(_shapes(type_name)):
        raw = _random_bytes(type_name, shape, seed)
        out = dequantize(torch.from_numpy(raw), type_name, shape)
        _assert_bits_equal(out, _reference(raw, type_name), nan_ok=type_name == "F16")


@pytest.mark.parametrize("type_name", GGUF_QUANTIZABLE)
def test_gguf_quantized_bit_exact(type_name):
    for seed, shape in enumerate(_shapes(type_name)):
        raw = _quantized_bytes(type_name, shape, seed)
        _assert_bits_equal(dequantize(torch.from_numpy(raw), type_name, shape), _reference(raw, type_name))


def test_quantized_values_are_near_the_original():
    # Bit-equality with the reference could hide a shared misreading; the round trip pins down the meaning.
    data = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    for type_name, tolerance in [("Q8_0", 0.02), ("Q5_1", 0.2), ("Q4_0", 0.4)]:
        raw = np.ascontiguousarray(gguf_quantize(data, GGMLQuantizationType[type_name])).view(np.uint8)
        out = dequantize(torch.from_numpy(raw), type_name, data.shape)
        assert (out - torch.from_numpy(data)).abs().max().item() < tolerance, type_name


# ---------------------------------------------------------------- output dtypes and odd inputs


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_output_is_the_float32_result_cast(type_name, dtype):
    raw = torch.from_numpy(_random_bytes(type_name, (2, 512)))
    out = dequantize(raw, type_name, (2, 512), dtype)
    assert out.dtype == dtype and out.shape == (2, 512)
    expected = dequantize(raw, type_name, (2, 512)).to(dtype)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q8_0", "Q4_K", "Q6_K"])
def test_unaligned_and_reshaped_bytes(type_name):
    shape = (3, 256)
    raw = torch.from_numpy(_random_bytes(type_name, shape))
    expected = dequantize(raw, type_name, shape)
    padded = torch.cat([torch.zeros(1, dtype=torch.uint8), raw.reshape(-1)])
    _assert_bits_equal(dequantize(padded[1:], type_name, shape), expected, nan_ok=True)
    _assert_bits_equal(dequantize(raw.reshape(-1, 2), type_name, shape), expected, nan_ok=True)


def test_float_types_are_views():
    raw = torch.from_numpy(_random_bytes("F32", (2, 8)))
    out = dequantize(raw, "F32", (2, 8))
    assert out.data_ptr() == raw.data_ptr()


def test_empty_tensor():
    assert dequantize(torch.zeros(0, dtype=torch.uint8), "Q4_K", (0, 256)).shape == (0, 256)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("type_name", TYPES)
def test_cuda_matches_cpu(type_name):
    raw = torch.from_numpy(_random_bytes(type_name, (4, 512)))
    expected = dequantize(raw, type_name, (4, 512))
    out = dequantize(raw.cuda(), type_name, (4, 512))
    assert out.device.type == "cuda"
    _assert_bits_equal(out.cpu(), expected, nan_ok=type_name == "F16")


# ---------------------------------------------------------------- errors


def test_unknown_type_names_it_and_the_supported_ones():
    with pytest.raises(ValueError, match=r"'Q7_K'.*Q4_0.*Q6_K"):
        dequantize(torch.zeros(4, dtype=torch.uint8), "Q7_K", (4,))
    with pytest.raises(ValueError, match="IQ4_XS"):
        quantized_nbytes("IQ4_XS", (256,))


def test_wrong_byte_count_names_both():
    with pytest.raises(ValueError, match=r"\(3, 256\).*432.*431"):
        dequantize(torch.zeros(431, dtype=torch.uint8), "Q4_K", (3, 256))


def test_last_dimension_must_fill_blocks():
    with pytest.raises(ValueError, match="block size 256"):
        quantized_nbytes("Q4_K", (256, 100))
    with pytest.raises(ValueError, match="block size 32"):
        dequantize(torch.zeros(36, dtype=torch.uint8), "Q8_0", (2, 32 + 16))


def test_raw_must_be_bytes():
    with pytest.raises(TypeError, match="uint8"):
        dequantize(torch.zeros(4), "F32", (4,))


def test_engine_code_needs_only_torch():
    imported = set()
    for node in ast.walk(ast.parse(Path(ggml.__file__).read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"numpy", "gguf"}
