"""`kleinbild quantize`: write a model's transformer as a quantized single file, and measure its weight memory."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from kleinbild.config import DiTConfig
from kleinbild.loading import load_into, read_transformer
from kleinbild.quant import FORMATS, quant_summary, weight_bytes
from kleinbild.quant_file import from_file_tensors, prepare_quantized, save_quantized
from kleinbild.transformer import Flux2Transformer


def quantize_file(model: str | Path, out: str | Path, fmt: str,
                  dtype: torch.dtype | None = torch.bfloat16) -> dict[str, Any]:
    """`kleinbild quantize`: write `model`'s transformer as a quantized official single file (the layers that stay
    unquantized in `dtype`, as the official files have them; None keeps the source dtype)."""
    state = read_transformer(model)
    already = from_file_tensors(dict(state))
    if already:
        raise ValueError(f"{model} is already quantized ({sorted({q.format for q in already.values()})}); "
                         "quantize the bf16 original instead")
    return save_quantized(state, out, fmt, dtype=dtype, metadata={"kleinbild_source": str(model)})


def memory_report(model: str | Path, formats: Iterable[str] = FORMATS) -> dict[str, Any]:
    """Weight bytes of the transformer as loaded in bf16 and in each format (tensors actually held by the module)."""
    res: dict[str, Any] = {"model": str(model)}
    cfg = None
    for fmt in ("bfloat16", *formats):
        state = read_transformer(model)
        if from_file_tensors(dict(state)):
            raise ValueError(f"{model} is already quantized; measure from the bf16 original")
        cfg = cfg or DiTConfig.from_state_dict_shapes({k: tuple(v.shape) for k, v in state.items()})
        with torch.device("meta"):
            dit = Flux2Transformer(cfg)
        prepare_quantized(dit, state, None if fmt == "bfloat16" else fmt, "cpu")
        load_into(dit, state, f"transformer {model}", torch.device("cpu"), torch.bfloat16)
        del state
        res[fmt] = {"bytes": weight_bytes(dit), "layers": quant_summary(dit)}
        del dit
    base = res["bfloat16"]["bytes"]
    for fmt in formats:
        res[fmt]["ratio"] = round(res[fmt]["bytes"] / base, 4)
    return res
