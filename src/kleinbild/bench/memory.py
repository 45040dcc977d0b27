"""`kleinbild bench --memory`: the peak memory of a generation in each format and offload mode, measured (the peak
RSS of a fresh process that loads the model and makes one image) beside the plan `kleinbild memory` computes.

The weights are seeded random values of a preset's real shapes (`bench.cpu.random_checkpoint`), so the numbers are
the official files' sizes without their download. The quantized transformer files are written once: fp8 as
`kleinbild quantize` writes it, Q4_K as a GGUF with every block-aligned 2-D weight in Q4_K; the Q8_0 text encoder
as a llama.cpp GGUF (its tokenizer included). One sampling step suffices: the peak does not grow with steps.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kleinbild.bench.cpu import peak_rss

# (label, transformer format, text encoder format): on-load names (fp8, int8) or a GGUF's type.
CONFIGS = (("bf16", None, None), ("fp8 DiT", "fp8", None), ("fp8 DiT + int8 text", "fp8", "int8"),
           ("Q4_K DiT + Q8_0 text", "Q4_K", "Q8_0"))
OFFLOADS = ("none", "model")


def _gguf_dit(folder: Path, out: Path, type_name: str) -> Path:
    import torch

    from kleinbild.bench.gguf_write import linear_type, write
    from kleinbild.loading import read_transformer

    if not out.is_file():
        state = read_transformer(folder)
        pick = linear_type(type_name, fallback="BF16")
        # Random blocks of the right size stand in for the quantized values; the other tensors keep theirs.
        write(out.with_suffix(".tmp"), {k: v.to(torch.bfloat16) for k, v in state.items()}, pick, spool=True)
        out.with_suffix(".tmp").rename(out)
    return out


def _gguf_text(folder: Path, out: Path, type_name: str) -> Path:
    from safetensors import safe_open

    from kleinbild.bench.gguf_write import linear_type, llama_name, qwen3_meta, tokenizer_meta, write
    from kleinbild.files import safetensors_files

    if out.is_file():
        return out
    te = folder / "text_encoder"
    config = json.loads((te / "config.json").read_text())
    state = {}
    for f in safetensors_files(te, "model"):
        with safe_open(str(f), framework="pt") as fh:
            state.update({llama_name(k): fh.get_tensor(k) for k in fh.keys() if k.startswith("model.layers.")
                          or k == "model.embed_tokens.weight"})

    def meta(w: Any) -> None:
        qwen3_meta(config, config["num_hidden_layers"])(w)
        tokenizer_meta(folder / "tokenizer", config["vocab_size"])(w)

    write(out.with_suffix(".tmp"), state, linear_type(type_name, fallback="F32"), arch="qwen3", meta=meta, spool=True)
    out.with_suffix(".tmp").rename(out)
    return out


def prepare(preset: str, folder: Path, say: Any = print) -> dict[str, dict[str, Any]]:
    """The load arguments of each configuration, writing its files first where needed."""
    from kleinbild.config import get_preset
    from kleinbild.quantize import quantize_file

    p = get_preset(preset)
    stem = Path(p.dit_file).stem
    fp8 = folder / f"{stem}-fp8.safetensors"
    if not fp8.is_file():
        say(f"writing {fp8} ...")
        quantize_file(folder, fp8, "fp8")
    say("writing the GGUF files (once) ...")
    q4 = _gguf_dit(folder, folder / f"{stem}-Q4_K.gguf", "Q4_K")
    q8 = _gguf_text(folder, folder / "qwen3-Q8_0.gguf", "Q8_0")
    # The random folder's model_index does not name the preset: its taps and prompt length are passed on.
    taps = {"text_layers": list(p.text.out_layers), "max_text_length": p.text.max_length}
    parts = {"vae": str(folder / "vae"), "preset": p.name, **taps}
    return {
        "bf16": {"model": str(folder), **taps},
        "fp8 DiT": {"model": str(fp8), "text_encoder": str(folder), **parts},
        "fp8 DiT + int8 text": {"model": str(fp8), "text_encoder": str(folder), "text_quant": "int8", **parts},
        "Q4_K DiT + Q8_0 text": {"model": str(q4), "text_encoder": str(q8), **parts},
    }


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured generation (run in a fresh process)."""
    import torch

    from kleinbild.pipeline import KleinPipeline

    t0 = time.perf_counter()
    load = {k: v for k, v in spec.items() if k not in ("model", "size", "steps")}
    pipe = KleinPipeline.from_pretrained(spec["model"], **{"device": "cpu", **load})
    loaded = peak_rss()
    pipe.generate("a red circle on a blue background", width=spec["size"], height=spec["size"], steps=spec["steps"],
                  seed=0)
    out = {"peak_rss": peak_rss(), "after_load_rss": loaded, "seconds": time.perf_counter() - t0,
           "quant": pipe.quant, "text_quant": pipe.text_quant}
    if pipe.device.type == "cuda":  # the process's whole life: loading and one image
        out["peak_vram"] = torch.cuda.max_memory_allocated(pipe.device)
        out["peak_vram_reserved"] = torch.cuda.max_memory_reserved(pipe.device)
    return out


def _run_child(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "kleinbild.bench.memory", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(preset: str = "klein-4b", size: int = 512, steps: int = 1, cache_dir: Path | None = None,
        threads: int = 2, say: Any = print, offloads: tuple[str, ...] = OFFLOADS, device: str = "cpu",
        configs: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Every configuration x offload mode: measured peak RSS (and peak VRAM on a GPU) and the computed plan."""
    from kleinbild import memory
    from kleinbild.bench.cpu import random_checkpoint
    from kleinbild.bench.serve import cpu_name
    from kleinbild.loading import LoadOptions, locate_with

    cache_dir = cache_dir or Path(os.environ.get("KLEINBILD_BENCH_CACHE", Path.home() / ".cache" / "kleinbild"))
    folder = random_checkpoint(preset, cache_dir / f"random-{preset}-seed0", 0, say)
    specs = prepare(preset, folder, say)
    rows = []
    for label in configs or [c for c, _, _ in CONFIGS]:
        for offload in offloads:
            spec = {**specs[label], "offload_mode": offload, "size": size, "steps": steps, "device": device}
            say(f"{label}, offload {offload} ...")
            got = _run_child(spec, threads)
            given = {k: v for k, v in spec.items() if k in ("vae", "text_encoder", "preset", "max_text_length")}
            opts = LoadOptions(**given, text_layers=tuple(spec["text_layers"]))
            p = memory.plan(locate_with(spec["model"], opts), text_quant=spec.get("text_quant"), offload=offload,
                            width=size, height=size, source=label, device=device if device != "cpu" else "cuda")
            rows.append({"config": label, "offload": offload, **got, "computed_host": p.peak_host,
                         "computed_device": p.peak_device, "weights": p.weights})
    return {"preset": preset, "size": size, "steps": steps, "threads": threads, "cpu": cpu_name(),
            "machine": platform.machine(), "device": device, "rows": rows}


def format_table(res: dict[str, Any]) -> str:
    gib = 2**30
    lines = [f"{res['preset']} at {res['size']}x{res['size']}, {res['cpu']}, {res['threads']} threads",
             "| configuration | offload | weights GiB | computed peak (CPU) GiB | measured peak RSS GiB | computed "
             "peak (GPU) GiB |", "|---|---|---|---|---|---|"]
    gpu = any("peak_vram" in r for r in res["rows"])
    if gpu:
        lines[1] += " measured peak VRAM (allocated / reserved) GiB |"
        lines[2] += "---|"
    for r in res["rows"]:
        lines.append(f"| {r['config']} | {r['offload']} | {sum(r['weights'].values()) / gib:.2f} | "
                     f"{r['computed_host'] / gib:.2f} | {r['peak_rss'] / gib:.2f} | {r['computed_device'] / gib:.2f} |"
                     + (f" {r['peak_vram'] / gib:.2f} / {r['peak_vram_reserved'] / gib:.2f} |" if gpu else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))


def decoder_report(sizes: tuple[int, ...] = (512, 1024), repeats: int = 3, threads: int = 2) -> dict[str, Any]:
    """The standard FLUX.2 decoder against BFL's small one (base width 96), random weights, bf16 on the CPU: median
    decode time (alternating, after a warm-up) and peak memory of each, each size in a fresh process."""
    from kleinbild.bench.serve import cpu_name

    rows = []
    for size in sizes:
        for r in range(repeats):
            for width in (128, 96) if r % 2 == 0 else (96, 128):
                rows.append(_run_decoder(size, width, threads))
    out: dict[str, Any] = {"cpu": cpu_name(), "threads": threads, "repeats": repeats, "sizes": {}}
    for size in sizes:
        entry = {}
        for width, name in ((128, "standard"), (96, "small")):
            runs = [x for x in rows if x["size"] == size and x["width"] == width]
            entry[name] = {"seconds": sorted(x["seconds"] for x in runs)[len(runs) // 2],
                           "peak_rss": max(x["peak_rss"] for x in runs)}
        entry["speedup"] = round(entry["standard"]["seconds"] / entry["small"]["seconds"], 3)
        out["sizes"][str(size)] = entry
    return out


def _run_decoder(size: int, width: int, threads: int) -> dict[str, Any]:
    code = (f"import json; from kleinbild.bench.memory import decode_once; "
            f"print(json.dumps(decode_once({size}, {width})))")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"decoder run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def decode_once(size: int, width: int) -> dict[str, Any]:
    import torch

    from kleinbild.autoencoder import AutoEncoder
    from kleinbild.config import AEConfig

    torch.manual_seed(0)
    with torch.device("meta"):
        ae = AutoEncoder(AEConfig(decoder_ch=None if width == 128 else width))
    ae = ae.to_empty(device="cpu").to(torch.bfloat16).eval()
    with torch.no_grad():
        for t in ae.parameters():
            t.normal_(0, 0.02)
        for name, b in ae.named_buffers():
            b.fill_(1.0 if name.endswith("running_var") else 0.0)
    ae.use_channels_last()
    ae.use_subpixel_upsample()
    z = torch.randn(1, ae.cfg.latent_channels, size // 16, size // 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        ae.decode(z[:, :, :2, :2])
        t0 = time.perf_counter()
        ae.decode(z)
        seconds = time.perf_counter() - t0
    return {"size": size, "width": width, "seconds": seconds, "peak_rss": peak_rss()}


def dequant_report(types: tuple[str, ...] = ("Q8_0", "Q4_K", "Q6_K"), m: int = 1536, k: int = 3072, n: int = 9216,
                   repeats: int = 5, device: str = "cpu") -> dict[str, Any]:
    """What a GGUF layer costs per matmul against bf16 on this machine: one (m x k) @ (k x n) linear (klein-4b's
    MLP input at 512x512), its weight dequantized just in time; medians over `repeats`."""
    import torch
    import torch.nn.functional as F

    from kleinbild.bench.gguf_write import random_blocks
    from kleinbild.bench.serve import cpu_name
    from kleinbild.quant import QuantLinear, QuantWeight

    dev = torch.device(device)

    def median(fn: Any) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    x = torch.randn(m, k, generator=torch.Generator().manual_seed(0)).bfloat16().to(dev)
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(1)).bfloat16() * 0.02).to(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    out: dict[str, Any] = {"device": name, "threads": torch.get_num_threads(), "shape": [m, k, n]}
    with torch.inference_mode():
        out["bf16"] = {"seconds": median(lambda: F.linear(x, w))}
        for t in types:
            raw = torch.from_numpy(random_blocks(t, (n, k)))
            layer = QuantLinear(QuantWeight(t, (n, k), raw, torch.ones(()))).to(dev)
            entry = {"seconds": median(lambda layer=layer: layer(x)),
                     "dequantize_seconds": median(lambda layer=layer: layer.dequantize(torch.bfloat16)),
                     "bytes": layer.qdata.numel()}
            entry["ratio"] = round(entry["seconds"] / out["bf16"]["seconds"], 3)
            out[t] = entry
    return out
