"""`kleinbild bench --device cuda`: warm, in-process timings on an accelerator, side by side with diffusers.

On a GPU the interesting numbers are warm ones (load is a copy, and one cold process says little), so this
path builds the full-size model with seeded random weights directly in device memory (no files: 16 GB of
random checkpoint would cost more than the whole measurement), gives diffusers' pipeline the very same
tensors, and then alternates the engines. Stage times come from a separate instrumented run that
synchronises at stage boundaries; the end-to-end times (prompt to PIL image, prompt cache off) have no
extra syncs. It runs on the CPU too (tests use a tiny preset), where it measures the same things in-process.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kleinbild.bench.cpu import (
    PROMPT,
    _diffusers_transformer_config,
    _diffusers_vae_config,
    _qwen3_config,
    dit_flops,
    peer_scheduler_config,
)
from kleinbild.config import ModelPreset, get_preset

Say = Callable[[str], None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fill_random(module: nn.Module, seed: int) -> None:
    """Seeded random weights in place, on whatever device the module lives: matrices N(0, 0.02), norm scales 1,
    other vectors 0 (the rule of bench.random_checkpoint)."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name or name.endswith("scale") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=g)


def _materialise(build: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype, seed: int,
                 rebuilt_buffers: tuple[str, ...] = ()) -> nn.Module:
    """Build on the meta device, allocate on `device`, fill with seeded random weights. Buffers would be left
    uninitialised, so a module with any must name them in `rebuilt_buffers` (the caller recomputes them)."""
    with torch.device("meta"):
        m = build()
    stray = sorted(set(dict(m.named_buffers())) - set(rebuilt_buffers))
    if stray:
        raise ValueError(f"buffers {stray} would stay uninitialised; recompute them and name them here")
    m = m.to(dtype).to_empty(device=device)  # cast while still on meta: no full-precision copy is ever made
    fill_random(m, seed)
    return m.eval().requires_grad_(False)


def random_pipeline(preset: str | ModelPreset, device: str | torch.device, tokenizer_dir: Path,
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Any:
    """A KleinPipeline of the preset's full size with seeded random weights made on `device` (no files); its
    tokenizer is trained into `tokenizer_dir` (reused if already there)."""
    from kleinbild.autoencoder import AutoEncoder
    from kleinbild.nano.train import corpus
    from kleinbild.pipeline import KleinPipeline
    from kleinbild.text_encoder import Qwen3TextEncoder
    from kleinbild.tokenizer import PromptTokenizer, train_qwen_style_tokenizer
    from kleinbild.transformer import Flux2Transformer

    p = get_preset(preset) if isinstance(preset, str) else preset
    dev = torch.device(device)
    dit = _materialise(lambda: Flux2Transformer(p.dit), dev, dtype, seed)
    te = _materialise(lambda: Qwen3TextEncoder(p.text), dev, dtype, seed + 1)
    torch.manual_seed(seed)  # the autoencoder is small: its own init (the batch-norm buffers need real values)
    ae = AutoEncoder(p.ae).to(dev, dtype).eval().requires_grad_(False)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        train_qwen_style_tokenizer(corpus(3000, seed), tokenizer_dir, vocab_size=600)
    tok = PromptTokenizer.from_dir(tokenizer_dir)
    return KleinPipeline(p, dit, ae, te, tok, dev, dtype, source=f"random:{p.name}:seed{seed}")


def diffusers_peer(pipe: Any, tokenizer_dir: Path, seed: int = 0) -> Any:
    """diffusers' Flux2KleinPipeline on the same weights (copied; the layouts differ), on the same device.

    The peer's text encoder is the whole Qwen3 model, as diffusers runs it: the layers kleinbild has get
    kleinbild's tensors, the deeper ones (which kleinbild never runs) seeded random ones."""
    import transformers
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    from kleinbild.convert import dit_to_diffusers, vae_to_diffusers

    p, dev, dt = pipe.preset, pipe.device, pipe.dtype

    def build(klass: Any, cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> Any:
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        with torch.device("meta"):
            m = klass(**cfg)
        m.load_state_dict(state, strict=True, assign=True)
        return m.to(dev, dt).eval().requires_grad_(False)

    transformer = build(Flux2Transformer2DModel, _diffusers_transformer_config(p.dit),
                        {k: v.clone() for k, v in dit_to_diffusers(pipe.transformer.state_dict()).items()})
    vae = build(AutoencoderKLFlux2, _diffusers_vae_config(p.ae),
                {k: v.clone() for k, v in vae_to_diffusers(pipe.autoencoder.state_dict()).items()})
    c = p.text
    cfg = transformers.Qwen3Config(**{k: v for k, v in _qwen3_config(c, c.hidden_size < 4096).items()
                                      if k not in ("architectures", "model_type")})
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    te = _materialise(lambda: transformers.Qwen3ForCausalLM(cfg), dev, dt, seed + 2,
                      rebuilt_buffers=("model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"))
    te.model.rotary_emb = Qwen3RotaryEmbedding(config=cfg).to(dev)  # float32, as from_pretrained leaves it
    missing, _ = te.load_state_dict(pipe.text_encoder.state_dict(), strict=False)  # copies into its own storage
    assert not [k for k in missing if k.startswith("model.layers.") and int(k.split(".")[2]) < c.layers_to_run]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    scheduler = FlowMatchEulerDiscreteScheduler(**peer_scheduler_config(p))
    peer = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=not p.uses_cfg)
    peer.set_progress_bar_config(disable=True)
    return peer


# ---------------------------------------------------------------- one generation per engine


def _kleinbild_call(pipe: Any, size: int, steps: int, seed: int) -> Callable[[Callable | None], Any]:
    def call(on_step: Callable | None = None) -> Any:
        cb = None if on_step is None else (lambda i, n, x: on_step())
        return pipe.generate(PROMPT, width=size, height=size, steps=steps, seed=seed, callback=cb).images[0]
    return call


def _diffusers_call(peer: Any, pipe: Any, size: int, steps: int, seed: int) -> Callable[[Callable | None], Any]:
    p = pipe.preset

    def call(on_step: Callable | None = None) -> Any:
        cb = None if on_step is None else (lambda _p, i, t, kw: (on_step(), kw)[1])
        return peer(prompt=PROMPT, height=size, width=size, num_inference_steps=steps,
                    generator=torch.Generator("cpu").manual_seed(seed), text_encoder_out_layers=p.text.out_layers,
                    max_sequence_length=p.text.max_length, callback_on_step_end=cb,
                    **({} if p.uses_cfg else {"guidance_scale": 1.0})).images[0]
    return call


def _stage_times(call: Callable, encoder: tuple[Any, str], decoder: list[tuple[Any, str]],
                 device: torch.device) -> dict[str, Any]:
    """One run with syncs at stage boundaries: text encoding, each step, decode (the sum of the `decoder` calls:
    latent to PIL image in both engines)."""
    marks: dict[str, float] = {}
    step_marks: list[float] = []

    def wrap(owner: Any, attr: str, name: str) -> Callable[[], None]:
        fn = getattr(owner, attr)

        def timed(*a: Any, **k: Any) -> Any:
            _sync(device)
            t = time.perf_counter()
            r = fn(*a, **k)
            _sync(device)
            marks[name] = marks.get(name, 0.0) + time.perf_counter() - t
            marks[name + "_end"] = time.perf_counter()
            return r
        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, fn)

    undo = [wrap(*encoder, "text")] + [wrap(*d, "decode") for d in decoder]

    def on_step() -> None:
        _sync(device)
        step_marks.append(time.perf_counter())
    try:
        call(on_step)
    finally:
        for u in undo:
            u()
    edges = [marks["text_end"], *step_marks]
    steps = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return {"text": marks["text"], "step": statistics.median(steps), "steps": steps, "decode": marks["decode"]}


def _end_to_end(call: Callable, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    call(None)  # ends in a PIL image: the copy to the host waits for the device
    return time.perf_counter() - t


def _memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        import resource
        return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    return {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def psnr(a: Any, b: Any) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    """Achieved GFLOP/s of an n x n x n product on random data (the ceiling the DiT step is compared with)."""
    if device.type == "cpu":
        from kleinbild.bench.cpu import matmul_rate as cpu_rate
        return cpu_rate(str(dtype).removeprefix("torch."), n=min(n, 2048))
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


# ---------------------------------------------------------------- the benchmark


def _compare_engines(pipe: Any, tok_dir: Path, res: dict[str, Any], size: int, steps: int, seed: int, repeats: int,
                     vs: str | None, compile: bool, say: Say) -> dict[str, Any]:
    """Warm-up, alternating end-to-end runs and stage times of kleinbild (plain, and compiled if asked) and the
    peer; fills res["engines"], FLOP/s and ratios; returns each engine's first image."""
    from kleinbild.pipeline import KleinPipeline

    p, dev, dt = pipe.preset, pipe.device, pipe.dtype
    calls: dict[str, Callable] = {"kleinbild": _kleinbild_call(pipe, size, steps, seed)}
    stage_hooks: dict[str, tuple[tuple[Any, str], list[tuple[Any, str]]]] = {
        "kleinbild": ((pipe, "encode_prompt"), [(pipe, "decode")])}
    if compile:
        fast = KleinPipeline(p, pipe.transformer, pipe.autoencoder, pipe.text_encoder, pipe.tokenizer, dev, dt)
        fast.configure_caches(prompts=0)
        fast.compile()
        calls["kleinbild-compiled"] = _kleinbild_call(fast, size, steps, seed)
        stage_hooks["kleinbild-compiled"] = ((fast, "encode_prompt"), [(fast, "decode")])
    if vs == "diffusers":
        peer = diffusers_peer(pipe, tok_dir, seed)
        calls["diffusers"] = _diffusers_call(peer, pipe, size, steps, seed)
        # kleinbild's decode stage ends in PIL images, so diffusers' includes its postprocess as well.
        stage_hooks["diffusers"] = ((peer, "encode_prompt"),
                                    [(peer.vae, "decode"), (peer.image_processor, "postprocess")])
    elif vs is not None:
        raise ValueError(f"unknown peer {vs!r}; use diffusers")

    images: dict[str, Any] = {}
    for name, call in list(calls.items()):
        t = time.perf_counter()
        try:
            images[name] = call(None)
            _sync(dev)
            first = time.perf_counter() - t
            call(None)
        except Exception as e:  # noqa: BLE001 - one engine failing must not lose the others' numbers
            say(f"{name} failed: {type(e).__name__}: {e}")
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:2000]
            del calls[name]
            continue
        say(f"{name}: first run {first:.2f}s (compilation included where compiled)")
        res["engines"][name] = {"first_run": round(first, 3)}
    times: dict[str, list[float]] = {n: [] for n in calls}
    for r in range(repeats):
        for name in (list(calls) if r % 2 == 0 else list(reversed(calls))):
            times[name].append(_end_to_end(calls[name], dev))
    for name, call in calls.items():
        st = _stage_times(call, *stage_hooks[name], dev)
        e = res["engines"][name]
        e.update({k: round(v, 4) for k, v in st.items() if k != "steps"})
        e["total"] = round(statistics.median(times[name]), 4)
        e["total_all"] = [round(x, 4) for x in times[name]]
        say(f"{name}: end to end median {e['total']:.3f}s {e['total_all']}")

    rate = matmul_rate(dev, dt)
    flops = dit_flops(p.dit, (size // p.ae.downscale) ** 2, p.text.max_length)
    res["matmul_gflops"] = round(rate, 1)
    res["dit_gflop_per_step"] = round(flops / 1e9, 1)
    for e in res["engines"].values():
        e["dit_fraction_of_matmul"] = round(flops / e["step"] / 1e9 / rate, 3)
    res["psnr_vs_kleinbild_db"] = {n: round(psnr(images["kleinbild"], im), 2) for n, im in images.items()
                                   if n != "kleinbild"}
    peer_numbers = res["engines"].get("diffusers")
    for name, key in (("kleinbild", "ratios"), ("kleinbild-compiled", "ratios_compiled")):
        if peer_numbers and name in res["engines"]:
            ours = res["engines"][name]
            res[key] = {s: round(ours[s] / peer_numbers[s], 3) for s in ("text", "step", "decode", "total")}
    return images


def run(preset: str, device: str = "cuda", size: int = 1024, steps: int = 4, dtype: str = "bfloat16",
        repeats: int = 5, vs: str | None = None, compile: bool = False, offload_modes: tuple[str, ...] = (),
        seed: int = 0, say: Say = print) -> dict[str, Any]:
    """Engines alternate, `repeats` end-to-end runs each after two warm-ups; then the memory modes, one at a time."""
    with tempfile.TemporaryDirectory(prefix="kleinbild-bench-") as tmp:
        return _run(preset, device, size, steps, dtype, repeats, vs, compile, offload_modes, seed, say,
                    Path(tmp) / "tokenizer")


def _run(preset: str, device: str, size: int, steps: int, dtype: str, repeats: int, vs: str | None, compile: bool,
         offload_modes: tuple[str, ...], seed: int, say: Say, tok_dir: Path) -> dict[str, Any]:
    from kleinbild.pipeline import KleinPipeline

    dev, dt = torch.device(device), getattr(torch, dtype)
    p = get_preset(preset)
    t0 = time.perf_counter()
    pipe = random_pipeline(p, dev, tok_dir, dt, seed)
    pipe.configure_caches(prompts=0)  # every run encodes its prompt, as a fresh request would
    _sync(dev)
    res: dict[str, Any] = {"preset": p.name, "device": str(dev), "size": size, "steps": steps, "dtype": dtype,
                           "repeats": repeats, "build_s": round(time.perf_counter() - t0, 2), "engines": {}}
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
    say(f"built random {p.name} on {dev} in {res['build_s']}s")

    images = _compare_engines(pipe, tok_dir, res, size, steps, seed, repeats, vs, compile, say)
    # The peer and its weights went with _compare_engines' frame: only kleinbild's weights stay allocated.
    _reset_memory(dev)
    res["resident_gb"] = round(sum(t.numel() * t.element_size() for m in (pipe.transformer, pipe.autoencoder,
                                   pipe.text_encoder) for t in m.parameters()) / 2**30, 2)
    _kleinbild_call(pipe, size, steps, seed)(None)
    res["memory"] = {"none": {k: round(v, 2) for k, v in _memory(dev).items()}}

    # Memory modes last: they move the weights to the host for good.
    if offload_modes:
        host = torch.device("cpu")
        mods = [m.to(host) for m in (pipe.transformer, pipe.autoencoder, pipe.text_encoder)]
        if host != dev:
            for m in mods:  # pinned host memory: the per-stage copies run at full bus speed
                for prm in m.parameters():
                    prm.data = prm.data.pin_memory()
        for mode in offload_modes:
            _reset_memory(dev)
            off = KleinPipeline(p, mods[0], mods[1], mods[2], pipe.tokenizer, dev, dt, offload_mode=mode)
            off.configure_caches(prompts=0)
            call = _kleinbild_call(off, size, steps, seed)
            img = call(None)
            t_run = _end_to_end(call, dev)
            m = {k: round(v, 2) for k, v in _memory(dev).items()}
            m["total"] = round(t_run, 3)
            m["psnr_vs_plain_db"] = round(psnr(images["kleinbild"], img), 2)
            res["memory"][mode] = m
            say(f"offload {mode}: {m}")
            del off, call
    return res


def format_table(res: dict[str, Any]) -> str:
    engines = list(res["engines"])
    head = (f"{res['preset']} {res['size']}x{res['size']}, {res['steps']} steps, {res['dtype']} on "
            f"{res.get('gpu', res['device'])}, warm, median of {res['repeats']}; matmul "
            f"{res['matmul_gflops'] / 1000:.0f} TFLOP/s, DiT {res['dit_gflop_per_step'] / 1000:.1f} TFLOP/step")
    lines = [head, f"{'stage':<24}" + "".join(f"{e:>20}" for e in engines)]
    labels = {"text": "text encoding (s)", "step": "DiT step (s)", "decode": "decode (s)",
              "total": "end to end (s)", "first_run": "first run (s)", "dit_fraction_of_matmul": "DiT / matmul rate"}
    for s, label in labels.items():
        lines.append(f"{label:<24}" + "".join(f"{res['engines'][e].get(s, float('nan')):>20.4f}" for e in engines))
    for key in ("ratios", "ratios_compiled"):
        if key in res:
            lines.append(f"{key} (kleinbild / diffusers): " + ", ".join(f"{k} {v}" for k, v in res[key].items()))
    if res.get("psnr_vs_kleinbild_db"):
        lines.append("PSNR vs kleinbild (dB): " + ", ".join(f"{k} {v}" for k, v in
                                                            res["psnr_vs_kleinbild_db"].items()))
    for mode, m in res.get("memory", {}).items():
        lines.append(f"memory, offload {mode}: " + ", ".join(f"{k} {v}" for k, v in m.items()))
    return "\n".join(lines)

