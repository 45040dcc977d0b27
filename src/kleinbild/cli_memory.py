"""`kleinbild quantize`, `kleinbild memory` (the memory a model will need, before loading it), `bench --memory`
and `--vram-budget` on generate and serve."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

_QUANT = ("fp8", "nvfp4", "int8")
_GGUF = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
# The combinations `--table` prints: (quant, text quant) x offload; the GGUF row only for a preset's shapes.
_TABLE = ((None, None), ("fp8", None), ("fp8", "int8"), ("Q4_K", "Q8_0"))


def add_parser(sub: Any, add_source_flags: Callable[[argparse.ArgumentParser, str | None], None],
               positive_int: Callable[[str], int]) -> None:
    m = sub.add_parser("memory", help="the memory a model needs (weights per component, peak for a size), computed "
                       "from its files before loading")
    m.add_argument("model_arg", nargs="?", metavar="MODEL", help="the model (as --model)")
    add_source_flags(m, None)
    m.add_argument("--quant", choices=_QUANT + _GGUF, help="with the transformer quantized on load (or, for a preset "
                   "not on this machine, as a GGUF of that type)")
    m.add_argument("--text-quant", choices=_QUANT + _GGUF, help="the same for the text encoder")
    m.add_argument("--offload", choices=("none", "model", "sequential"), default="none")
    m.add_argument("--width", type=positive_int, default=1024)
    m.add_argument("--height", type=positive_int, default=1024)
    m.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    m.add_argument("--table", action="store_true", help="every combination of bf16 / fp8 / fp8 + int8 text "
                   "encoder with offload none and model")
    m.add_argument("--json", action="store_true", help="print JSON")


def add_budget_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vram-budget", type=float, metavar="GiB", help="pick the offload mode (in place of --offload) and "
                   "the formats (keeping a --quant/--text-quant given) whose computed peak fits this much device "
                   "memory (host memory on the CPU), and say what was chosen")


def cmd_memory(args: argparse.Namespace) -> int:
    from kleinbild import memory
    from kleinbild.loading import LoadOptions, locate_with, pick_dtype

    model = args.model_arg or args.model or "nano"
    combos = [(q, t, off) for q, t in _TABLE for off in ("none", "model")] if args.table else [
        (args.quant, args.text_quant, args.offload)]
    size = {"width": args.width, "height": args.height, "dtype": pick_dtype(args.dtype)}
    files = None if _preset_elsewhere(model) else locate_with(model, LoadOptions(
        vae=args.vae, text_encoder=args.text_encoder, preset=args.preset))
    if files is None:
        sys.stderr.write(f"{model} is not on this machine: computed from its official shapes\n")
    plans = []
    for q, t, off in combos:
        try:
            if files is None:
                plans.append(memory.plan_preset(model, quant=q, text_quant=t, offload=off, **size))
            elif q in _GGUF or t in _GGUF:
                if not args.table:
                    raise ValueError(f"{model} is on this machine: a GGUF's type comes from the file; give the .gguf")
            else:
                plans.append(memory.plan(files, quant=q, text_quant=t, offload=off, source=str(model), **size))
        except ValueError:
            if not args.table:
                raise
            continue  # an already-quantized file: that row does not exist
    if args.json:
        print(json.dumps([p.summary() for p in plans] if args.table else plans[0].summary()))
    else:
        print(f"{model} at {args.width}x{args.height}, {args.dtype}:")
        print(memory.format_table(plans))
    return 0


def _preset_elsewhere(model: str) -> bool:
    """A preset name whose weights are not on this machine (the plan then needs no file)."""
    from kleinbild.config import PRESETS
    from kleinbild.loading import where_is

    return model.lower() in PRESETS and where_is(PRESETS[model.lower()]) is None


def apply_budget(args: argparse.Namespace, options: Any, width: int | None, height: int | None) -> Any:
    """`options` with the offload mode and formats that fit `--vram-budget` (unchanged without it)."""
    if getattr(args, "vram_budget", None) is None:
        return options
    from kleinbild import memory
    from kleinbild.loading import locate_with, pick_device

    files = locate_with(args.model, options)
    size = files.preset.default_size
    device = pick_device(options.device).type
    chosen, p = memory.fit_budget(args.model, options, args.vram_budget, width or size, height or size, device)
    sys.stderr.write(memory.describe(p, args.vram_budget) + "\n")
    return chosen


def add_bench_flag(b: argparse.ArgumentParser) -> None:
    b.add_argument("--memory", action="store_true", help="measure the peak memory (RSS) of one image in each format "
                   "(bf16, fp8, fp8 + int8 text encoder, GGUF Q4_K + Q8_0) and offload mode, beside the computed plan")
    b.add_argument("--decoders", action="store_true", help="with --memory: decode time and peak memory of the standard "
                   "decoder against BFL's small one at --size")
    b.add_argument("--dequant", action="store_true", help="with --memory: a GGUF layer's time per matmul (Q8_0, "
                   "Q4_K, Q6_K dequantized just in time) against bf16")


def cmd_bench_memory(args: argparse.Namespace) -> int:
    from kleinbild.bench import memory as bench_memory

    if args.dequant:
        print(json.dumps(bench_memory.dequant_report(device=args.device or "cpu")))
        return 0
    if args.decoders:
        print(json.dumps(bench_memory.decoder_report((args.size,), repeats=args.repeats, threads=args.threads or 2)))
        return 0
    res = bench_memory.run(args.preset, size=args.size, steps=args.steps or 4,
                           cache_dir=Path(args.cache_dir) if args.cache_dir else None, threads=args.threads or 2,
                           say=lambda m: print(m, file=sys.stderr, flush=True), device=args.device or "cpu")
    print(bench_memory.format_table(res))
    print(json.dumps(res))
    return 0


def add_quantize_parser(sub: Any, positive_int: Callable[[str], int]) -> None:
    q = sub.add_parser("quantize", help="write a transformer as a quantized single file (fp8, nvfp4, int8), or "
                       "measure weight memory (--report) and image quality (--quality)")
    q.add_argument("model", nargs="?", help="the bf16 transformer: official or diffusers .safetensors, diffusers "
                   "folder, preset")
    q.add_argument("out", nargs="?", help="output .safetensors (default: MODEL-FORMAT.safetensors beside a file)")
    q.add_argument("--format", "-f", choices=_QUANT, default="fp8")
    q.add_argument("--report", action="store_true", help="print the transformer's weight bytes in bf16 and every "
                   "format instead of writing a file")
    q.add_argument("--quality", type=positive_int, metavar="N", help="shapes-world models: PSNR against bf16 and "
                   "eval score per format (transformer, text encoder, GGUF Q8_0/Q5_0/Q4_0) on N prompts per task")
    q.add_argument("--matmul", action="store_true", help="per-format matmul error and time of one klein-4b layer "
                   "(3072 -> 9216) on this machine")
    q.add_argument("--device")


def cmd_quantize(args: argparse.Namespace) -> int:
    from kleinbild import quantize

    if args.matmul:
        print(json.dumps(quantize.matmul_report()))
        return 0
    if not args.model:
        raise ValueError("give the model to quantize: kleinbild quantize MODEL [OUT] --format fp8|nvfp4|int8")
    if args.quality:
        from kleinbild.nano.quality import quality_report

        print(json.dumps(quality_report(args.model, n=args.quality, device=args.device, text_formats=_QUANT,
                                        gguf_types=("Q8_0", "Q5_0", "Q4_0"))))
        return 0
    if args.report:
        print(json.dumps(quantize.memory_report(args.model)))
        return 0
    out = args.out
    if out is None:
        src = Path(args.model)
        if not src.is_file():
            raise ValueError("give the output file: kleinbild quantize MODEL OUT.safetensors --format ...")
        out = src.with_name(f"{src.stem}-{args.format}.safetensors")
    res = quantize.quantize_file(args.model, Path(out), args.format)
    print(out)
    sys.stderr.write(f"{res['layers']} layers as {res['format']}, {res['bytes'] / 2**20:.1f} MiB, "
                     f"{res['seconds']:.1f}s\n")
    return 0
