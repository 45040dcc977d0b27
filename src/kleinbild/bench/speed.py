"""Speed probes for a GPU run (they also run, small, on the CPU): recompilations across sizes, compiled static
against dynamic graphs, the eager GPU path's forms against the ones they replaced, FP8 against bf16, step caching
on a base model, and per-op profiles of both engines.

`python -m kleinbild.bench.speed --device cuda --out DIR` runs them all on seeded random weights of the presets'
full size and writes `speed.json` (and the profiles' Chrome traces) to DIR; `--only` picks some. Random weights
say nothing about quality: PSNRs here only show that a path computes nearly the same thing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kleinbild.bench.cpu import PROMPT
from kleinbild.bench.device import _sync, diffusers_peer, random_pipeline
from kleinbild.bench.step_cache import psnr  # 100 dB for identical images, so the JSON stays finite

PROBES = ("recompiles", "compiled_shapes", "eager_paths", "fp8", "step_cache", "profile")
Say = Callable[[str], None]


def _timed(fn: Callable[[], Any], dev: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    out = []
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def _twin(pipe: Any) -> Any:
    """A second pipeline over the same modules (its own compiled wrappers and caches)."""
    from kleinbild.pipeline import KleinPipeline

    twin = KleinPipeline(pipe.preset, pipe.transformer, pipe.autoencoder, pipe.text_encoder, pipe.tokenizer,
                         pipe.device, pipe.dtype)
    twin.configure_caches(prompts=0)
    return twin


def recompiles(pipe: Any, sizes: list[int], say: Say) -> dict[str, Any]:
    """Graphs compiled over `sizes` (square) per --compile-shapes mode; dynamo only (the count is the backend's
    input, whatever the backend), so this costs seconds, not compilations."""
    from kleinbild.compiling import SHAPES

    out: dict[str, Any] = {"sizes": sizes}
    for name, dynamic in SHAPES.items():
        torch._dynamo.reset()
        twin = _twin(pipe)
        twin.compile(dynamic=dynamic, backend="eager")
        for s in sizes:
            twin.generate(PROMPT, width=s, height=s, steps=1, seed=0)
        out[name] = twin.compilations
        say(f"recompiles, {name}: {out[name]} over sizes {sizes}")
    torch._dynamo.reset()
    return out


def compiled_shapes(pipe: Any, size: int, steps: int, repeats: int, say: Say, backend: str = "inductor"
                    ) -> dict[str, Any]:
    """End to end at `size` with the transformer compiled static and dynamic (inductor), and eager."""
    dev, out = pipe.device, {}
    for name, dynamic in (("eager", None), ("static", False), ("dynamic", True)):
        torch._dynamo.reset()
        twin = _twin(pipe)
        if name != "eager":
            twin.compile(dynamic=dynamic, decoder=False, backend=backend)
        t = time.perf_counter()
        twin.generate(PROMPT, width=size, height=size, steps=steps, seed=0)
        first = time.perf_counter() - t
        total = _timed(lambda t=twin: t.generate(PROMPT, width=size, height=size, steps=steps, seed=0), dev,
                       repeats)
        out[name] = {"first_run": round(first, 3), "total": round(total, 4)}
        say(f"compiled shapes, {name}: {out[name]}")
    torch._dynamo.reset()
    return out


def eager_paths(pipe: Any, size: int, steps: int, repeats: int, say: Say) -> dict[str, Any]:
    """Eager end to end with the DiT's GPU forms (the complex RoPE product, the fused RMSNorm) against the real-form
    RoPE and the seven-pass RMSNorm they replaced, one at a time and both (`bench.traffic` counts their bytes)."""
    from kleinbild import transformer as dit

    def real_rope(device: torch.device) -> bool:
        return False

    def unfused_norm(self: Any, x: torch.Tensor) -> torch.Tensor:
        return dit.rms_norm(x, self.scale, self.eps, fused=False)

    variants = {"current": {}, "real_rope": {"rope": real_rope}, "unfused_rms_norm": {"norm": unfused_norm},
                "both_previous": {"rope": real_rope, "norm": unfused_norm}}
    saved = dit.complex_rope, dit.RMSNorm.forward
    out: dict[str, Any] = {}
    ref = None
    try:
        for name, swap in variants.items():
            dit.complex_rope, dit.RMSNorm.forward = swap.get("rope", saved[0]), swap.get("norm", saved[1])
            img = pipe.generate(PROMPT, width=size, height=size, steps=steps, seed=0).images[0]
            ref = ref or img
            total = _timed(lambda: pipe.generate(PROMPT, width=size, height=size, steps=steps, seed=0), pipe.device,
                           repeats)
            out[name] = {"total": round(total, 4), "psnr_vs_current_db": round(psnr(ref, img), 2)}
            say(f"eager paths, {name}: {out[name]}")
    finally:
        dit.complex_rope, dit.RMSNorm.forward = saved
    return out


def fp8(pipe: Any, size: int, steps: int, repeats: int, say: Say, backend: str = "inductor") -> dict[str, Any]:
    """bf16 against FP8 (weights per tensor; `_scaled_mm` where the GPU has it), eager and compiled, with activation
    scales per call and then calibrated (static, as the official files carry them): end to end. Quantizes `pipe`'s
    transformer in place, so it runs after the probes that need bf16."""
    from kleinbild.quant import native_kernel, quantize_model
    from kleinbild.quantize import calibrate_input_scales

    dev, out = pipe.device, {}
    ref = pipe.generate(PROMPT, width=size, height=size, steps=steps, seed=0).images[0]
    out["bf16"] = {"total": round(_timed(lambda: pipe.generate(PROMPT, width=size, height=size, steps=steps,
                                                               seed=0), dev, repeats), 4)}
    out["layers"] = quantize_model(pipe.transformer, "fp8")
    out["kernel"] = native_kernel("fp8", dev)
    for name in ("fp8", "fp8-compiled", "fp8-static", "fp8-static-compiled"):
        if name == "fp8-static":
            out["calibrated_layers"] = calibrate_input_scales(
                pipe.transformer, lambda: pipe.generate(PROMPT, width=size, height=size, steps=steps, seed=1))
        twin = _twin(pipe)
        if name.endswith("compiled"):
            torch._dynamo.reset()
            twin.compile(decoder=False, backend=backend)
        img = twin.generate(PROMPT, width=size, height=size, steps=steps, seed=0).images[0]
        total = _timed(lambda t=twin: t.generate(PROMPT, width=size, height=size, steps=steps, seed=0), dev,
                       repeats)
        out[name] = {"total": round(total, 4), "psnr_vs_bf16_db": round(psnr(ref, img), 2)}
        say(f"{name}: {out[name]}")
    return out


def step_cache(preset: str, size: int, steps: int, thresholds: tuple[tuple[str, float], ...], tok_dir: Path,
               dev: torch.device, say: Say) -> dict[str, Any]:
    """A base preset, uncached against cached: denoising seconds and the steps reused."""
    pipe = random_pipeline(preset, dev, tok_dir)
    pipe.configure_caches(prompts=0)
    pipe.generate(PROMPT, width=size, height=size, steps=1, seed=0)
    rows, ref = [], None
    for mode, threshold in ((None, None), *thresholds):
        kw = {} if mode is None else {"cache": mode, "cache_threshold": threshold}
        res = pipe.generate(PROMPT, width=size, height=size, steps=steps, seed=0, **kw)
        ref = ref or res.images[0]
        rows.append({"mode": mode or "none", "threshold": threshold,
                     "denoise_s": round(res.settings["timings"]["denoise"], 3),
                     "reused": (res.settings["step_cache"] or {}).get("reused_steps", 0),
                     "psnr_db": round(psnr(ref, res.images[0]), 2)})
        say(f"step cache {preset}: {rows[-1]}")
    return {"preset": preset, "size": size, "steps": steps, "rows": rows}


def profile(pipe: Any, size: int, steps: int, tok_dir: Path, out: Path | None, vs: bool, say: Say,
            top: int = 25) -> dict[str, Any]:
    """The ops that take the most device (else CPU) time in one generation, per engine."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from kleinbild.bench.device import _diffusers_call, _kleinbild_call

    calls = {"kleinbild": _kleinbild_call(pipe, size, steps, 0)}
    if vs:
        calls["diffusers"] = _diffusers_call(diffusers_peer(pipe, tok_dir), pipe, size, steps, 0)
    cuda = pipe.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    res: dict[str, Any] = {}
    for name, call in calls.items():
        call(None)
        with torch_profile(activities=acts) as prof:
            call(None)
            _sync(pipe.device)
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
        res[name] = [{"op": e.key, "ms": round(getattr(e, key) / 1e3, 3), "calls": e.count} for e in events]
        if out is not None:
            prof.export_chrome_trace(str(out / f"trace-{name}.json"))
        say(f"profile {name}: " + ", ".join(f"{r['op']} {r['ms']}ms" for r in res[name][:6]))
    return res


def run(args: argparse.Namespace, say: Say) -> dict[str, Any]:
    dev = torch.device(args.device)
    only = set(args.only.split(",")) if args.only else set(PROBES)
    unknown = only - set(PROBES)
    if unknown:
        raise ValueError(f"unknown probe(s) {sorted(unknown)}; choose from {', '.join(PROBES)}")
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"device": str(dev), "preset": args.preset, "size": args.size}
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
    with tempfile.TemporaryDirectory(prefix="kleinbild-speed-") as tmp:
        tok = Path(tmp) / "tokenizer"
        pipe = random_pipeline(args.preset, dev, tok)
        pipe.configure_caches(prompts=0)
        if "recompiles" in only:
            res["recompiles"] = recompiles(pipe, args.sizes, say)
        if "compiled_shapes" in only:
            res["compiled_shapes"] = compiled_shapes(pipe, args.size, args.steps, args.repeats, say, args.backend)
        if "eager_paths" in only:
            res["eager_paths"] = eager_paths(pipe, args.size, args.steps, args.repeats, say)
        if "profile" in only:
            res["profile"] = profile(pipe, args.size, args.steps, tok, out, args.vs, say)
        if "fp8" in only:
            res["fp8"] = fp8(pipe, args.size, args.steps, args.repeats, say, args.backend)
        del pipe
        if "step_cache" in only:
            pairs = tuple((m, float(t)) for m, t in (x.split(":") for x in args.cache_settings.split(",")))
            res["step_cache"] = step_cache(args.base_preset, args.size, args.base_steps, pairs, tok, dev, say)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kleinbild.bench.speed", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="klein-4b")
    ap.add_argument("--base-preset", default="klein-base-4b")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[512, 768, 1024, 1280])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--base-steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache-settings", default="first-block:0.08,first-block:0.15,teacache:0.15,teacache:0.3")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (eager: dynamo only, for a "
                    "quick check that every probe runs)")
    ap.add_argument("--vs", action="store_true", help="profile diffusers beside kleinbild")
    ap.add_argument("--only", help=f"comma-separated probes among {', '.join(PROBES)} (default: all)")
    ap.add_argument("--out", help="folder for speed.json and the profiles' traces")
    args = ap.parse_args(argv)
    res = run(args, lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps(res)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "speed.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
