"""`kleinbild memory` (the memory a model will need, before loading it) and `--vram-budget` on generate and serve."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

_QUANT = ("fp8", "nvfp4", "int8")
# The combinations `--table` prints: (quant, text quant) x offload.
_TABLE = ((None, None), ("fp8", None), ("fp8", "int8"))


def add_parser(sub: Any, add_source_flags: Callable[[argparse.ArgumentParser, str | None], None],
               positive_int: Callable[[str], int]) -> None:
    m = sub.add_parser("memory", help="the memory a model needs (weights per component, peak for a size), computed "
                       "from its files before loading")
    m.add_argument("model_arg", nargs="?", metavar="MODEL", help="the model (as --model)")
    add_source_flags(m, None)
    m.add_argument("--quant", choices=_QUANT, help="with the transformer quantized on load")
    m.add_argument("--text-quant", choices=_QUANT, help="with the text encoder quantized on load")
    m.add_argument("--offload", choices=("none", "model", "sequential"), default="none")
    m.add_argument("--width", type=positive_int, default=1024)
    m.add_argument("--height", type=positive_int, default=1024)
    m.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    m.add_argument("--table", action="store_true", help="every combination of bf16 / fp8 / fp8 + int8 text "
                   "encoder with offload none and model")
    m.add_argument("--json", action="store_true", help="print JSON")


def add_budget_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vram-budget", type=float, metavar="GB", help="pick the offload mode (in place of --offload) and "
                   "the formats (keeping a --quant/--text-quant given) whose computed peak fits this much device "
                   "memory (host memory on the CPU), and say what was chosen")


def cmd_memory(args: argparse.Namespace) -> int:
    from kleinbild import memory
    from kleinbild.loading import LoadOptions, locate_with, pick_dtype

    model = args.model_arg or args.model or "nano"
    files = locate_with(model, LoadOptions(vae=args.vae, text_encoder=args.text_encoder, preset=args.preset))
    combos = [(q, t, off) for q, t in _TABLE for off in ("none", "model")] if args.table else [
        (args.quant, args.text_quant, args.offload)]
    plans = []
    for q, t, off in combos:
        try:
            plans.append(memory.plan(files, quant=q, text_quant=t, offload=off, width=args.width, height=args.height,
                                     dtype=pick_dtype(args.dtype), source=str(model)))
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
