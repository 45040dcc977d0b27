"""`kleinbild quantize`: write a model's transformer as a quantized single file, measure its weight memory, and
calibrate the per-layer activation scales of FP8 compute."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kleinbild.config import DiTConfig
from kleinbild.loading import load_into, read_transformer
from kleinbild.quant import (
    FORMATS,
    FP8_MAX,
    QuantLinear,
    native_kernel,
    quant_summary,
    quantize_weight,
    weight_bytes,
)
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


def calibrate_input_scales(model: nn.Module, run: Callable[[], Any]) -> int:
    """Give every fp8 layer of `model` the static activation scale the official FP8 files carry (`input_scale`): the
    largest |input| the layer sees while `run()` generates, over 448. Scales set earlier are dropped first, so the
    calibration runs with per-call scales. Returns how many layers were calibrated (`QuantLinear.quant_weight` carries
    the scale, and `quant_file.to_file_tensors` writes it as `X.input_scale`)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.format == "fp8"]
    if not layers:
        raise ValueError("the model has no fp8 layers to calibrate: load it with quant='fp8' (--quant fp8)")
    amax: dict[int, Tensor] = {}

    def observe(mod: nn.Module, args: tuple[Tensor, ...]) -> None:
        seen = args[0].detach().abs().amax().float()
        amax[id(mod)] = torch.maximum(amax[id(mod)], seen) if id(mod) in amax else seen

    hooks = [m.register_forward_pre_hook(observe) for m in layers]
    for m in layers:
        m.qinput = None
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    missing = [m for m in layers if id(m) not in amax]
    if missing:
        raise ValueError(f"{len(missing)} fp8 layers saw no input while calibrating: run() must generate an image")
    for m in layers:
        m.qinput = (amax[id(m)] / FP8_MAX).clamp_min(1e-12).reshape(())
    return len(layers)


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


def relative_error(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def matmul_report(n: int = 9216, k: int = 3072, m: int = 256, seed: int = 0, repeats: int = 3) -> dict[str, Any]:
    """Per-format matmul error (vs float64 on the unquantized weight) and CPU time of one (m x k) @ (k x n) layer
    against bf16 F.linear, on this machine's current thread setting."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    x = torch.randn(m, k, generator=g)
    ref = x.double() @ w.double().t()

    def best(fn: Callable[[], Tensor]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    wb, xb = w.bfloat16(), x.bfloat16()
    res: dict[str, Any] = {"shape": [m, k, n], "threads": torch.get_num_threads(),
                           "bf16": {"error": relative_error(F.linear(xb, wb).float(), ref),
                                    "seconds": best(lambda: F.linear(xb, wb))}}
    with torch.inference_mode():
        for fmt in FORMATS:
            layer = QuantLinear(quantize_weight(w, fmt))
            dq = layer.dequantize(torch.float32)
            entry: dict[str, Any] = {
                "weight_error": relative_error(dq, w),
                "matmul_error_dequant": relative_error(F.linear(x, dq), ref),
                "kernel": native_kernel(fmt, x.device) or "dequantize just in time",
                "seconds": best(lambda layer=layer: layer(xb)),
                "bytes": layer.quant_weight().nbytes(),
            }
            entry["matmul_error"] = relative_error(layer(xb).float(), ref)
            res[fmt] = entry
    res["bf16"]["bytes"] = n * k * 2
    return res
