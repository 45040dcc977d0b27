"""`kleinbild quantize --quality`: what each quantization format does to a shapes-world model's images."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kleinbild.images import psnr
from kleinbild.nano import shapes
from kleinbild.nano.evaluate import evaluate
from kleinbild.pipeline import KleinPipeline
from kleinbild.quant import FORMATS, emulate_fp8_compute, native_kernel
from kleinbild.quantize import calibrate_input_scales, relative_error


def quality_report(model: str = "nano", formats: Iterable[str] = FORMATS, n: int = 20, seed: int = 0,
                   tasks: Iterable[str] = ("single", "double", "edit", "compose", "held_out"),
                   device: str | None = None, text_formats: Iterable[str] = (),
                   gguf_types: Iterable[str] = ()) -> dict[str, Any]:
    """Against the bf16 pipeline: PSNR of each configuration's images (same prompts and seeds: the shapes eval set)
    and its eval score (the analyser's "all right" rate over `tasks`), for the shapes-world (nano) models. The
    configurations: the transformer in each of `formats` (fp8 also with fp8 activations, as a GPU computes it:
    scaled per call, and with calibrated static scales), the text encoder in each of `text_formats` (also the
    relative error of its stacked hidden states on the eval prompts), and the transformer as a GGUF of each of
    `gguf_types` (written to a temporary folder)."""
    tasks = list(tasks)
    examples = [(i, ex) for task in tasks for i, ex in enumerate(shapes.eval_set(task, n, seed))]

    def images(pipe: Any) -> list[Any]:
        return [_generate(pipe, ex, seed + i).images[0] for i, ex in examples]

    def score(pipe: Any) -> float:
        rep = evaluate(pipe, tasks, n=n, seed=seed)
        return sum(r.score * len(r.samples) for r in rep.results.values()) / sum(len(r.samples)
                                                                                for r in rep.results.values())

    prompts = sorted({ex.prompt for _, ex in examples})
    ref_pipe = KleinPipeline.from_pretrained(model, dtype="bfloat16", device=device)
    ref, ref_hidden = images(ref_pipe), ref_pipe.encode_prompt(prompts)
    res: dict[str, Any] = {"model": model, "n_images": len(ref), "bfloat16": {"score": score(ref_pipe)}}
    del ref_pipe
    with tempfile.TemporaryDirectory() as tmp:
        for label, load in _configs(model, formats, text_formats, gguf_types, Path(tmp)):
            compute = load.pop("fp8_compute", None)
            pipe = KleinPipeline.from_pretrained(load.pop("model", model), dtype="bfloat16", device=device, **load)
            emulate_fp8_compute(compute is not None)
            try:
                if compute == "calibrated":
                    _calibrate(pipe, tasks, n, seed)
                vals = [psnr(a, b) for a, b in zip(images(pipe), ref, strict=True)]
                entry = {"score": score(pipe)}
                if "quant" in load:
                    entry["kernel"] = native_kernel(load["quant"], pipe.device) or "dequantize just in time"
            finally:
                emulate_fp8_compute(False)
            finite = [v for v in vals if math.isfinite(v)]
            entry.update({"psnr_mean": round(sum(finite) / len(finite), 2) if finite else float("inf"),
                          "psnr_min": round(min(vals), 2)})
            entry["score_delta"] = round(entry["score"] - res["bfloat16"]["score"], 4)
            if "text_quant" in load or label.startswith("text"):
                entry["hidden_error"] = round(relative_error(pipe.encode_prompt(prompts), ref_hidden), 5)
            res[label] = entry
            del pipe
    return res


def _generate(pipe: Any, ex: Any, seed: int) -> Any:
    """One shapes-world example at the model's own size, its source pictures rendered as references."""
    size = pipe.preset.default_size
    return pipe.generate(ex.prompt, [shapes.render(s, size) for s in ex.sources] or None, width=size, height=size,
                         seed=seed)


def _calibrate(pipe: Any, tasks: list[str], n: int, seed: int) -> None:
    """Static activation scales from other examples than the scored ones (a tenth as many, another seed)."""
    calib_seed = seed + 7919
    examples = [ex for task in tasks for ex in shapes.eval_set(task, max(1, n // 10), calib_seed)]
    calibrate_input_scales(pipe.transformer, lambda: [_generate(pipe, ex, calib_seed) for ex in examples])


def _configs(model: str, formats: Iterable[str], text_formats: Iterable[str], gguf_types: Iterable[str],
             tmp: Path) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = [(fmt, {"quant": fmt}) for fmt in formats]
    if "fp8" in formats:  # fp8 activations too, as the GPU kernel computes: scaled per call, and calibrated
        out += [("fp8 compute", {"quant": "fp8", "fp8_compute": "per call"}),
                ("fp8 compute, calibrated", {"quant": "fp8", "fp8_compute": "calibrated"})]
    out += [(f"text {fmt}", {"text_quant": fmt}) for fmt in text_formats]
    if gguf_types:
        from kleinbild.bench.gguf_write import linear_type, write
        from kleinbild.loading import locate, read_transformer

        files = locate(model)
        state = read_transformer(files.dit_files[0])
        parts = {"vae": files.ae_files[0], "text_encoder": files.text_files[0].parent, "preset": files.preset.name}
        for t in gguf_types:
            path = write(tmp / f"{files.preset.name}-{t}.gguf", state, linear_type(t))
            out.append((f"gguf {t}", {"model": str(path), **parts}))
    return out
