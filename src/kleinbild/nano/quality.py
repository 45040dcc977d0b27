"""`kleinbild quantize --quality`: what each quantization format does to a shapes-world model's images."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from kleinbild.images import psnr
from kleinbild.nano import shapes
from kleinbild.nano.evaluate import evaluate
from kleinbild.pipeline import KleinPipeline
from kleinbild.quant import FORMATS, native_kernel


def quality_report(model: str = "nano", formats: Iterable[str] = FORMATS, n: int = 20, seed: int = 0,
                   tasks: Iterable[str] = ("single", "double", "edit", "compose", "held_out"),
                   device: str | None = None) -> dict[str, Any]:
    """Against the bf16 pipeline: PSNR of each format's images (same prompts and seeds: the shapes eval set) and the
    eval score of each (the analyser's "all right" rate over `tasks`). For the shapes-world (nano) models."""
    tasks = list(tasks)

    def images(pipe: Any) -> list[Any]:
        out = []
        size = pipe.preset.default_size
        for task in tasks:
            for i, ex in enumerate(shapes.eval_set(task, n, seed)):
                refs = [shapes.render(s, size) for s in ex.sources]
                out.append(pipe.generate(ex.prompt, refs or None, width=size, height=size, seed=seed + i).images[0])
        return out

    def score(pipe: Any) -> float:
        rep = evaluate(pipe, tasks, n=n, seed=seed)
        return sum(r.score * len(r.samples) for r in rep.results.values()) / sum(len(r.samples)
                                                                                for r in rep.results.values())

    ref_pipe = KleinPipeline.from_pretrained(model, dtype="bfloat16", device=device)
    ref = images(ref_pipe)
    res: dict[str, Any] = {"model": model, "n_images": len(ref), "bfloat16": {"score": score(ref_pipe)}}
    del ref_pipe
    for fmt in formats:
        pipe = KleinPipeline.from_pretrained(model, dtype="bfloat16", device=device, quant=fmt)
        got = images(pipe)
        vals = [psnr(a, b) for a, b in zip(got, ref, strict=True)]
        finite = [v for v in vals if math.isfinite(v)]
        res[fmt] = {"psnr_mean": round(sum(finite) / len(finite), 2) if finite else float("inf"),
                    "psnr_min": round(min(vals), 2), "score": score(pipe),
                    "kernel": native_kernel(fmt, pipe.device) or "dequantize just in time"}
        res[fmt]["score_delta"] = round(res[fmt]["score"] - res["bfloat16"]["score"], 4)
        del pipe
    return res
