"""`kleinbild bench`: stage timings, peak memory and achieved FLOP/s, optionally side by side with diffusers.

Each measured run is a fresh child process (so load time and peak RSS are the whole process's), and the
two engines alternate, so drift on a noisy machine hits both. Random full-size weights are written once,
in the diffusers layout, so both engines load the same files and nothing has to be downloaded.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kleinbild.config import ModelPreset

PROMPT = "a red fox in fresh snow, soft winter light, detailed fur"


def peer_scheduler_config(p: ModelPreset) -> dict[str, Any]:
    """diffusers' FlowMatchEulerDiscreteScheduler settings that give the preset's schedule."""
    if p.schedule_shift is None:
        return {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                "time_shift_type": "exponential"}
    # A static shift on the pipeline's uniform sigmas: s t / (1 + (s - 1) t), as sampling.schedule does.
    return {"num_train_timesteps": 1000, "shift": p.schedule_shift, "use_dynamic_shifting": False}


# ---------------------------------------------------------------- machine and model arithmetic


def matmul_rate(dtype: str = "bfloat16", n: int = 2048, seconds: float = 1.5) -> float:
    """Achieved GFLOP/s of a square matmul in `dtype` on this machine's current thread setting."""
    import torch

    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    for _ in range(2):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e9


def dit_flops(cfg: Any, n_img: int, n_txt: int, n_ref: int = 0) -> float:
    """FLOPs of one DiT forward: the linears (2 per weight per token) plus attention (QK^T and AV)."""
    h, m = cfg.hidden_size, cfg.mlp_hidden
    s = n_img + n_txt + n_ref
    n_stream = n_img + n_ref
    double = 2 * (n_stream + n_txt) * (3 * h * h + h * h + h * 2 * m + m * h)
    single = 2 * s * (h * (3 * h + 2 * m) + (h + m) * h)
    attn = 4 * s * s * h
    embed = 2 * (n_stream * cfg.in_channels * h + n_txt * cfg.context_dim * h + n_img * h * cfg.in_channels)
    return cfg.depth * (double + attn) + cfg.depth_single * (single + attn) + embed


# ---------------------------------------------------------------- random checkpoint


def _diffusers_transformer_config(cfg: Any) -> dict:
    return {
        "_class_name": "Flux2Transformer2DModel",
        "patch_size": 1,
        "in_channels": cfg.in_channels,
        "out_channels": None,
        "num_layers": cfg.depth,
        "num_single_layers": cfg.depth_single,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_dim,
        "timestep_guidance_channels": cfg.time_dim,
        "mlp_ratio": cfg.mlp_ratio,
        "axes_dims_rope": list(cfg.axes_dim),
        "rope_theta": cfg.theta,
        "eps": 1e-6,
        "guidance_embeds": False,
    }


def _diffusers_vae_config(cfg: Any) -> dict:
    n = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKLFlux2",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "batch_norm_eps": cfg.bn_eps,
        "patch_size": [cfg.patch, cfg.patch],
    }


def _qwen3_config(cfg: Any, tied: bool) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "max_position_embeddings": 40960,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "torch_dtype": "bfloat16",
    }


class _ShardWriter:
    """Writes tensors to size-capped safetensors shards plus the index diffusers/transformers read."""

    def __init__(self, folder: Path, stem: str, cap_bytes: int = 2 * 2**30):
        self.folder, self.stem, self.cap = folder, stem, cap_bytes
        self.pending: dict[str, Any] = {}
        self.size = 0
        self.files: list[dict[str, Any]] = []

    def add(self, name: str, tensor: Any) -> None:
        self.pending[name] = tensor.contiguous()
        self.size += tensor.numel() * tensor.element_size()
        if self.size >= self.cap:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"{self.stem}-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / name))
        self.files.append({"name": name, "keys": list(self.pending)})
        self.pending, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        total = len(self.files)
        weight_map = {}
        for i, f in enumerate(self.files):
            final = f"{self.stem}-{i + 1:05d}-of-{total:05d}.safetensors"
            (self.folder / f["name"]).rename(self.folder / final)
            weight_map.update(dict.fromkeys(f["keys"], final))
        index = {"metadata": {}, "weight_map": weight_map}
        (self.folder / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index))


def _random_like(shape: tuple[int, ...], name: str, g: Any, dtype: Any) -> Any:
    import torch

    if len(shape) == 1:  # norm scales and biases
        return (torch.ones(shape) if "norm" in name or name.endswith("scale") else torch.zeros(shape)).to(dtype)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def random_checkpoint(preset_name: str, folder: Path, seed: int = 0, say: Any = print) -> Path:
    """A diffusers-layout folder with seeded random weights of a preset's full size (written once)."""
    import torch

    from kleinbild.config import get_preset

    p = get_preset(preset_name)
    done = folder / ".complete"
    if done.is_file():
        return folder
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    _random_transformer(p, folder / "transformer", g)
    _random_vae(p, folder / "vae", seed)
    _random_text_encoder(p, folder / "text_encoder", g)
    _pipeline_files(p, folder, seed)
    done.write_text(json.dumps({"preset": p.name, "seed": seed}))
    say(f"random {p.name} checkpoint written to {folder} in {time.perf_counter() - t0:.0f}s")
    return folder


def _random_transformer(p: ModelPreset, d: Path, g: Any) -> None:
    import torch

    from kleinbild.convert import dit_to_diffusers
    from kleinbild.transformer import Flux2Transformer

    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(_diffusers_transformer_config(p.dit)))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux2Transformer(p.dit).state_dict().items()}
    w = _ShardWriter(d, "diffusion_pytorch_model")
    blocks: dict[str, dict[str, Any]] = {}
    for k, shape in shapes.items():
        group = ".".join(k.split(".")[:2]) if k.startswith(("double_blocks.", "single_blocks.")) else "top"
        blocks.setdefault(group, {})[k] = shape
    for names in blocks.values():  # one block at a time keeps memory at one block
        for k, t in dit_to_diffusers({k: _random_like(s, k, g, torch.bfloat16) for k, s in names.items()}).items():
            w.add(k, t)
    w.close()


def _random_vae(p: ModelPreset, d: Path, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    from kleinbild.autoencoder import AutoEncoder
    from kleinbild.convert import vae_to_diffusers

    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(_diffusers_vae_config(p.ae)))
    torch.manual_seed(seed)
    ae = AutoEncoder(p.ae)
    save_file({k: v.contiguous() for k, v in vae_to_diffusers(ae.state_dict()).items()},
              str(d / "diffusion_pytorch_model.safetensors"))


def _random_text_encoder(p: ModelPreset, d: Path, g: Any) -> None:
    import torch

    bf16 = torch.bfloat16
    d.mkdir(exist_ok=True)
    c = p.text
    tied = c.hidden_size < 4096  # Qwen3-4B ties its LM head to the embeddings; Qwen3-8B does not
    (d / "config.json").write_text(json.dumps(_qwen3_config(c, tied)))
    w = _ShardWriter(d, "model")
    w.add("model.embed_tokens.weight", _random_like((c.vocab_size, c.hidden_size), "embed", g, bf16))
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    for i in range(c.num_layers):  # all layers, as in the real checkpoint (the reference runs them all)
        pre = f"model.layers.{i}."
        for name, shape in (
            ("self_attn.q_proj.weight", (q, c.hidden_size)),
            ("self_attn.k_proj.weight", (kv, c.hidden_size)),
            ("self_attn.v_proj.weight", (kv, c.hidden_size)),
            ("self_attn.o_proj.weight", (c.hidden_size, q)),
            ("self_attn.q_norm.weight", (c.head_dim,)),
            ("self_attn.k_norm.weight", (c.head_dim,)),
            ("mlp.gate_proj.weight", (c.intermediate_size, c.hidden_size)),
            ("mlp.up_proj.weight", (c.intermediate_size, c.hidden_size)),
            ("mlp.down_proj.weight", (c.hidden_size, c.intermediate_size)),
            ("input_layernorm.weight", (c.hidden_size,)),
            ("post_attention_layernorm.weight", (c.hidden_size,)),
        ):
            w.add(pre + name, _random_like(shape, name, g, bf16))
    w.add("model.norm.weight", torch.ones(c.hidden_size, dtype=bf16))
    if not tied:
        w.add("lm_head.weight", _random_like((c.vocab_size, c.hidden_size), "lm_head", g, bf16))
    w.close()


def _pipeline_files(p: ModelPreset, folder: Path, seed: int) -> None:
    """The tokenizer (trained on the shapes corpus: only its format matters here), scheduler and model index."""
    from kleinbild.nano.train import corpus
    from kleinbild.tokenizer import train_qwen_style_tokenizer

    train_qwen_style_tokenizer(corpus(3000, seed), folder / "tokenizer", vocab_size=600)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "FlowMatchEulerDiscreteScheduler", **peer_scheduler_config(p)}))
    klass = "Flux2KleinKVPipeline" if p.kv_cache_refs else "Flux2KleinPipeline"
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": klass, "_diffusers_version": "0.42.1", "is_distilled": not p.uses_cfg,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "Qwen2TokenizerFast"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"],
    }))


# ---------------------------------------------------------------- one measured run (child process)


def peak_rss() -> int:
    """This process's peak resident memory in bytes. Linux's VmHWM belongs to the address space, which exec makes
    anew; getrusage's ru_maxrss survives exec, so a child started by a large parent would report the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _peak_rss_gb() -> float:
    return peak_rss() / 2**30


def child(engine: str, folder: str, size: int, steps: int, dtype: str, text_layers: list[int],
          max_text: int, seed: int, offload: str = "none", quant: str | None = None,
          quant_file: str | None = None) -> dict[str, Any]:
    import torch

    t_start = time.perf_counter()
    dt = getattr(torch, dtype)
    out: dict[str, Any] = {"engine": engine}
    marks: list[float] = []
    if engine == "kleinbild":
        from kleinbild.pipeline import KleinPipeline

        if quant_file:  # the transformer from a file `kleinbild quantize` wrote: mapped, not quantized on load
            import dataclasses

            from kleinbild.loading import locate

            files = locate(folder, None, None, None, tuple(text_layers), max_text)
            files = dataclasses.replace(files, dit_files=[Path(quant_file)], dit_layout="bfl")
            pipe = KleinPipeline.from_files(files, device="cpu", dtype=dt, source=quant_file, offload_mode=offload)
        else:
            pipe = KleinPipeline.from_pretrained(folder, device="cpu", dtype=dt, text_layers=tuple(text_layers),
                                                 max_text_length=max_text, offload_mode=offload, quant=quant)
        out["load"] = time.perf_counter() - t_start
        out["quant_layers"] = sum(type(m).__name__ == "QuantLinear" for m in pipe.transformer.modules())
        t0 = time.perf_counter()
        res = pipe.generate(PROMPT, width=size, height=size, steps=steps, seed=seed,
                            callback=lambda i, n, x: marks.append(time.perf_counter()))
        tm = res.settings.get("timings", {})
        out["text"] = tm.get("text")
        out["decode"] = tm.get("decode")
        image = res.images[0]
    elif engine == "diffusers":
        from diffusers import Flux2KleinPipeline

        pipe = Flux2KleinPipeline.from_pretrained(folder, dtype=dt)
        pipe.set_progress_bar_config(disable=True)
        out["load"] = time.perf_counter() - t_start
        stage: dict[str, float] = {}

        def timed(name: str, fn: Any) -> Any:
            def wrapper(*a: Any, **k: Any) -> Any:
                t = time.perf_counter()
                r = fn(*a, **k)
                stage[name] = stage.get(name, 0.0) + time.perf_counter() - t
                return r
            return wrapper

        pipe.encode_prompt = timed("text", pipe.encode_prompt)
        pipe.vae.decode = timed("decode", pipe.vae.decode)
        # kleinbild's decode stage ends in PIL images, so this one includes the postprocess as well.
        pipe.image_processor.postprocess = timed("decode", pipe.image_processor.postprocess)
        t0 = time.perf_counter()
        image = pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=steps,
                     generator=torch.Generator("cpu").manual_seed(seed), text_encoder_out_layers=tuple(text_layers),
                     max_sequence_length=max_text,
                     callback_on_step_end=lambda p, i, t, kw: (marks.append(time.perf_counter()), kw)[1]).images[0]
        out.update(stage)
    else:
        raise ValueError(f"unknown engine {engine!r}")
    # Step i runs from the previous mark (or the end of text encoding) to its own mark.
    first = t0 + (out["text"] or 0.0)
    edges = [first, *marks]
    out["steps"] = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    out["step"] = statistics.median(out["steps"]) if out["steps"] else None
    image.save(Path(folder).parent / f"bench-{engine}.png")
    out["total"] = time.perf_counter() - t_start
    out["peak_rss_gb"] = _peak_rss_gb()
    return out


def _run_child(engine: str, args: dict[str, Any], threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "kleinbild.bench.cpu", "--child", engine, json.dumps(args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the benchmark


STAGES = ("load", "text", "step", "decode", "total", "peak_rss_gb")


def run(
    preset: str,
    size: int = 512,
    steps: int = 4,
    dtype: str = "bfloat16",
    threads: int | None = None,
    vs: str | None = None,
    repeats: int = 3,
    cache_dir: Path | None = None,
    seed: int = 0,
    offload: str = "model",
    quant: str | None = None,
    prequantized: bool = False,
    say: Any = print,
) -> dict[str, Any]:
    import torch

    from kleinbild.config import get_preset

    threads = threads or torch.get_num_threads()
    p = get_preset(preset)
    cache_dir = cache_dir or Path(os.environ.get("KLEINBILD_BENCH_CACHE", Path.home() / ".cache" / "kleinbild"))
    folder = random_checkpoint(p.name, cache_dir / f"random-{p.name}-seed{seed}", seed, say)
    args = {"folder": str(folder), "size": size, "steps": steps, "dtype": dtype,
            "text_layers": list(p.text.out_layers), "max_text": p.text.max_length, "seed": seed,
            "offload": offload, "quant": quant}
    if quant and prequantized:
        from kleinbild.quantize import quantize_file

        qfile = folder / f"transformer-{quant}.safetensors"
        if not qfile.is_file():  # written once, like `kleinbild quantize`, and not timed
            say(f"writing {qfile} ...")
            quantize_file(folder, qfile, quant)
        args["quant_file"] = str(qfile)
    engines = ["kleinbild"] + ([vs] if vs else [])
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    for r in range(repeats):
        for e in engines if r % 2 == 0 else reversed(engines):
            say(f"run {r + 1}/{repeats}: {e} ...")
            runs[e].append(_run_child(e, args, threads))
    torch.set_num_threads(threads)
    rate = matmul_rate(dtype)
    m = p.ae.downscale
    n_img = (size // m) ** 2
    flops = dit_flops(p.dit, n_img, p.text.max_length)
    result: dict[str, Any] = {
        "preset": p.name, "size": size, "steps": steps, "dtype": dtype, "threads": threads, "repeats": repeats,
        "offload": offload, "quant": quant, "prequantized": bool(quant and prequantized),
        "quant_layers": runs["kleinbild"][0].get("quant_layers", 0),
        "matmul_gflops": round(rate, 1), "dit_gflop_per_step": round(flops / 1e9, 1), "engines": {},
    }
    for e, rs in runs.items():
        med = {s: statistics.median(r[s] for r in rs if r.get(s) is not None) for s in STAGES}
        med["dit_gflops"] = flops / med["step"] / 1e9
        med["dit_fraction_of_matmul"] = med["dit_gflops"] / rate
        result["engines"][e] = {k: round(v, 3) for k, v in med.items()}
    if vs:
        a, b = result["engines"]["kleinbild"], result["engines"][vs]
        result["ratios"] = {s: round(a[s] / b[s], 3) for s in STAGES if b.get(s)}
    return result


def format_table(res: dict[str, Any]) -> str:
    engines = list(res["engines"])
    lines = [
        f"{res['preset']} {res['size']}x{res['size']}, {res['steps']} steps, {res['dtype']}, {res['threads']} threads, "
        f"median of {res['repeats']}; matmul {res['matmul_gflops']:.0f} GFLOP/s, DiT {res['dit_gflop_per_step']:.0f} "
        f"GFLOP/step; kleinbild offload={res.get('offload')} quant={res.get('quant')}",
        f"{'stage':<22}" + "".join(f"{e:>12}" for e in engines) + ("       ratio" if "ratios" in res else ""),
    ]
    labels = {"load": "load (s)", "text": "text encoding (s)", "step": "DiT step (s)", "decode": "decode (s)",
              "total": "whole process (s)", "peak_rss_gb": "peak RSS (GB)", "dit_fraction_of_matmul":
              "DiT / matmul rate"}
    for s, label in labels.items():
        row = f"{label:<22}" + "".join(f"{res['engines'][e].get(s, float('nan')):>12.3f}" for e in engines)
        if "ratios" in res and s in res["ratios"]:
            row += f"{res['ratios'][s]:>12.3f}"
        lines.append(row)
    return "\n".join(lines)


def _main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        a = json.loads(sys.argv[3])
        opts = {k: a[k] for k in ("offload", "quant", "quant_file") if k in a} if sys.argv[2] == "kleinbild" else {}
        print(json.dumps(child(sys.argv[2], a["folder"], a["size"], a["steps"], a["dtype"], a["text_layers"],
                               a["max_text"], a["seed"], **opts)))
        return
    raise SystemExit("usage: kleinbild bench ... (this module's own entry point is for child runs)")


if __name__ == "__main__":
    _main()

