"""`kleinbild bench --step-cache`: step caching's speed against its quality, the uncached run as the peer.

nano-base (its trained weights): the eval score of a few tasks, the median PSNR of each image against the uncached
image of the same seed, the steps reused, and the wall time of the whole eval. With `--random-weights`, also a
base preset's full-size transformer with seeded random weights at a small size: time per image and the steps
reused (its PSNR says little about quality: random weights amplify every change, which is why quality is read on
nano-base). Every configuration runs in this one process, one after another, on the same examples and seeds.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SETTINGS: tuple[tuple[str, float], ...] = (
    ("first-block", 0.04), ("first-block", 0.08), ("first-block", 0.15),
    ("teacache", 0.08), ("teacache", 0.15), ("teacache", 0.3),
)
TASKS = ("single", "double", "edit", "plain")


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB of two 8-bit images (100 for identical ones, so medians stay finite)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = float(((x - y) ** 2).mean())
    return 100.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _options(mode: str | None, threshold: float | None) -> dict[str, Any]:
    return {} if mode is None else {"cache": mode, "cache_threshold": threshold}


def nano_rows(tasks: tuple[str, ...] = TASKS, n: int = 40, steps: int = 50,
              settings: tuple[tuple[str, float], ...] = SETTINGS, say: Any = print) -> list[dict[str, Any]]:
    """One row per configuration (the first uncached) of nano-base's eval with step caching."""
    from kleinbild.nano.evaluate import evaluate
    from kleinbild.pipeline import KleinPipeline

    pipe = KleinPipeline.from_pretrained("nano-base", device="cpu")
    rows: list[dict[str, Any]] = []
    reference: list[Image.Image] = []
    for mode, threshold in ((None, None), *settings):
        t0 = time.perf_counter()
        report = evaluate(pipe, tasks, n=n, steps=steps, options=_options(mode, threshold))
        seconds = time.perf_counter() - t0
        samples = [s for r in report.results.values() for s in r.samples]
        images = [s.image for s in samples]
        reference = reference or images
        reused = [s.settings["step_cache"]["reused_steps"] / steps for s in samples] if mode else [0.0]
        row = {"mode": mode or "none", "threshold": threshold, "seconds": round(seconds, 2),
               "speedup": round(rows[0]["seconds"] / seconds, 3) if rows else 1.0,
               "reused": round(statistics.mean(reused), 3),
               "psnr": round(statistics.median(psnr(a, b) for a, b in zip(images, reference, strict=True)), 2),
               "scores": {t: round(r.score, 3) for t, r in report.results.items()}}
        rows.append(row)
        say(f"step cache, nano-base: {row}")
    return rows


def random_rows(preset: str, size: int, steps: int, cache_dir: Path,
                settings: tuple[tuple[str, float], ...] = SETTINGS, say: Any = print) -> list[dict[str, Any]]:
    """Time per image with each configuration, for a preset's full-size architecture with random weights."""
    from kleinbild.bench.cpu import PROMPT, random_checkpoint
    from kleinbild.config import get_preset
    from kleinbild.pipeline import KleinPipeline

    p = get_preset(preset)
    if not p.uses_cfg:
        raise ValueError(f"step caching is for base models; {preset} is guidance-distilled (try klein-base-4b)")
    folder = random_checkpoint(p.name, cache_dir / f"random-{p.name}-seed0", 0, say)
    pipe = KleinPipeline.from_pretrained(str(folder), device="cpu", preset=p.name)
    pipe.generate(PROMPT, width=size, height=size, steps=1, seed=0)  # warm: first-call allocations
    rows: list[dict[str, Any]] = []
    reference = None
    for mode, threshold in ((None, None), *settings):
        out = pipe.generate(PROMPT, width=size, height=size, steps=steps, seed=0, **_options(mode, threshold))
        seconds = out.settings["timings"]["denoise"]
        reference = reference or out.images[0]
        row = {"mode": mode or "none", "threshold": threshold, "denoise_seconds": round(seconds, 2),
               "speedup": round(rows[0]["denoise_seconds"] / seconds, 3) if rows else 1.0,
               "reused": (out.settings["step_cache"] or {}).get("reused_steps", 0),
               "psnr": round(psnr(out.images[0], reference), 2)}
        rows.append(row)
        say(f"step cache, random {p.name}: {row}")
    return rows


def format_table(rows: list[dict[str, Any]], title: str) -> str:
    keys = [k for k in rows[0] if k != "scores"]
    tasks = list(rows[0].get("scores", {}))
    head = "| " + " | ".join(keys + tasks) + " |"
    lines = [title, "", head, "|" + "---|" * (len(keys) + len(tasks))]
    for r in rows:
        cells = ["-" if r[k] is None else str(r[k]) for k in keys] + [str(r["scores"][t]) for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cli(args: Any) -> int:
    """`kleinbild bench --step-cache`: the tables on stdout (then one line of JSON), progress on stderr."""
    import json
    import os
    import sys

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res: dict[str, Any] = {"nano-base": nano_rows(n=args.eval_n, steps=args.steps or 50, say=say)}
    print(format_table(res["nano-base"], f"nano-base, 128x128, {args.steps or 50} steps, CFG 2, n={args.eval_n}"))
    if args.random_weights:
        cache = Path(args.cache_dir or os.environ.get("KLEINBILD_BENCH_CACHE", Path.home() / ".cache" / "kleinbild"))
        steps = args.steps or 12
        res[args.preset] = random_rows(args.preset, args.size, steps, cache, say=say)
        title = f"\n{args.preset}, random weights, {args.size}x{args.size}, {steps} steps"
        print(format_table(res[args.preset], title))
    print(json.dumps(res))
    return 0


__all__ = ["SETTINGS", "TASKS", "cli", "format_table", "nano_rows", "psnr", "random_rows"]
