"""Training the nano models on the shapes world: tokenizer, autoencoder, base (flow matching) and the bundle;
the distillation stage, which builds on these, is `kleinbild.nano.distill`.

Every stage is reproducible from a seed (the data of step k depends only on seed and k), resumable from its
last checkpoint, and sized for a 2-core CPU. Checkpoints are written atomically, so an interrupted run
loses at most the steps since the last save.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kleinbild import sampling
from kleinbild.autoencoder import AutoEncoder
from kleinbild.config import ModelPreset, get_preset
from kleinbild.images import to_tensor
from kleinbild.nano import shapes
from kleinbild.nano.plain import sample_plain
from kleinbild.text_encoder import Qwen3TextEncoder
from kleinbild.tokenizer import PromptTokenizer, train_qwen_style_tokenizer
from kleinbild.transformer import Flux2Transformer

Log = Callable[[str], None]


# ---------------------------------------------------------------- checkpoints


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_safetensors(tensors: dict[str, Tensor], path: Path, dtype: torch.dtype | None = None) -> None:
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point() and not k.startswith("bn."):
            v = v.to(dtype)
        out[k] = v.contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(out, str(tmp))
    os.replace(tmp, path)


def _resume(ck: Path, parts: dict[str, Any], dev: torch.device, stage: str, say: Log) -> int:
    """Load each part (a module or optimiser) from its key in checkpoint `ck`; returns the step it was saved at,
    0 when there is no checkpoint yet."""
    if not ck.is_file():
        return 0
    state = torch.load(ck, weights_only=True, map_location=dev)
    for key, part in parts.items():
        part.load_state_dict(state[key])
    say(f"{stage}: resumed at step {state['step']}")
    return state["step"]


class EMA:
    """Exponential moving average of a module's parameters (what gets shipped)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm up so early weights do not linger
        shadow, live = list(self.shadow.parameters()), [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(shadow, live, 1 - d)  # one launch per group instead of per tensor (matters on GPUs)


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the base rate."""
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step, total) / total)))


# ---------------------------------------------------------------- tokenizer


def corpus(n: int, seed: int) -> list[str]:
    """Prompts of every kind the models will see (captions, edit instructions, composition requests)."""
    rng = random.Random(seed)
    return [shapes.sample_example(rng).prompt for _ in range(n)]


def train_tokenizer(
    out_dir: Path, seed: int = 0, vocab_size: int = 1024, n_texts: int = 20000, say: Log = print
) -> PromptTokenizer:
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = corpus(n_texts, seed)
    train_qwen_style_tokenizer(texts, out_dir, vocab_size=vocab_size)
    tok = PromptTokenizer.from_dir(out_dir)
    longest = max(int(tok.encode([t], 256)[1].sum()) for t in texts[:2000])
    say(f"tokenizer: {tok.vocab_size} tokens, longest prompt {longest} tokens (with the chat template)")
    return tok


# ---------------------------------------------------------------- data


def render_batch(scenes: Sequence[shapes.Scene], size: int) -> Tensor:
    return torch.cat([to_tensor(shapes.render(s, size)) for s in scenes])


def render_bytes(scenes: Sequence[shapes.Scene], size: int) -> Tensor:
    """(B, 3, H, W) uint8: a quarter of the bytes of `render_batch` to pass between processes."""
    return torch.from_numpy(np.stack([np.asarray(shapes.render(s, size).convert("RGB")) for s in scenes])).permute(
        0, 3, 1, 2)


def bytes_to_unit(px: Tensor) -> Tensor:
    """uint8 pixels -> float32 in [-1, 1], the same values as `to_tensor`."""
    return (px.float() / 255.0) * 2.0 - 1.0


@dataclass
class Batch:
    kind: str
    prompts: list[str]
    targets: list[shapes.Scene]
    sources: list[tuple[shapes.Scene, ...]]


def sample_batch(rng: random.Random, size: int, mix: tuple[float, ...]) -> Batch:
    """One kind per batch, so reference counts (and sequence lengths) agree within it.

    `mix` weighs t2i, edit, compose and (optionally) position drills, loose captions (shapes.sample_loose) and plain
    ones (plain.sample_plain: what a new user types, counts in words)."""
    kinds = ["t2i", "edit", "compose", "drill", "loose", "plain"][: len(mix)]
    kind = rng.choices(kinds, weights=mix)[0]
    draw = {"t2i": shapes.sample_t2i, "edit": shapes.sample_edit, "compose": shapes.sample_compose,
            "drill": shapes.sample_drill, "loose": shapes.sample_loose, "plain": sample_plain}[kind]
    exs = [draw(rng) for _ in range(size)]
    return Batch(kind, [e.prompt for e in exs], [e.target for e in exs], [e.sources for e in exs])


class LatentCache:
    """Latents of rendered scenes, keyed by scene: single objects and reference images repeat a lot."""

    def __init__(self, ae: AutoEncoder, size: int, capacity: int = 200_000):
        self.ae, self.size, self.capacity = ae, size, capacity
        self.store: dict[shapes.Scene, Tensor] = {}
        self.hits = self.misses = 0

    def __call__(self, scenes: Sequence[shapes.Scene]) -> Tensor:
        todo = list(dict.fromkeys(s for s in scenes if s not in self.store))
        self.misses += len(todo)
        self.hits += len(scenes) - len(todo)
        if todo:
            with torch.no_grad():
                z = self.ae.encode(render_batch(todo, self.size).to(self.ae.bn.running_mean.device))
            if len(self.store) + len(todo) > self.capacity:
                self.store.clear()
            self.store.update(zip(todo, z, strict=True))
        return torch.stack([self.store[s] for s in scenes])


def sample_t(n: int, g: torch.Generator, shift: float, uniform: float = 0.1) -> Tensor:
    """Logit-normal times shifted towards noise (like the inference schedule), with some uniform ones mixed in
    so the ends of [0, 1], where shapes get their edges, are trained too."""
    u = torch.sigmoid(torch.randn(n, generator=g))
    flat = torch.rand(n, generator=g)
    u = torch.where(torch.rand(n, generator=g) < uniform, flat, u)
    return shift * u / (1 + (shift - 1) * u)


# ---------------------------------------------------------------- stage: autoencoder


@dataclass
class AEArgs:
    steps: int = 1500
    batch: int = 12
    lr: float = 1e-3
    size: int = 128
    crop: int = 64  # train on crops of full-size renders: same object scale, a quarter of the compute
    seed: int = 0
    save_every: int = 250
    device: str = "cpu"
    init: str = ""  # an ae.safetensors to start from instead of random weights (no checkpoint in the run yet)
    # Train the decoder alone: the encoder and the latent statistics stay as they are, so a DiT trained on this
    # autoencoder's latents stays valid and only the pixels it is read out to get better.
    decoder_only: bool = False


def train_autoencoder(run: Path, preset: ModelPreset, args: AEArgs, say: Log = print) -> AutoEncoder:
    out = run / "ae"
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    ae = AutoEncoder(preset.ae)
    if args.init:
        init = Path(args.init)
        if not init.is_file():
            raise FileNotFoundError(f"--init {init}: no such autoencoder file (give an ae.safetensors)")
        ae.load_state_dict(load_file(str(init)))
    elif args.decoder_only:
        raise ValueError("decoder-only training keeps an existing encoder: give the autoencoder to start from (--init)")
    ae.to(dev)
    trained = ae.decoder if args.decoder_only else ae
    opt = torch.optim.AdamW(trained.parameters(), lr=args.lr, weight_decay=0.0)
    ck = out / "ckpt.pt"
    step = _resume(ck, {"model": ae, "opt": opt}, dev, "ae", say)
    ae.train()
    if args.decoder_only:
        ae.encoder.eval().requires_grad_(False)
    z = preset.ae.z_channels
    t0, first, losses = time.perf_counter(), step, []
    while step < args.steps:
        rng = random.Random(args.seed * 1_000_003 + step)
        x = render_batch([shapes.sample_scene(rng) for _ in range(args.batch)], args.size)
        if args.crop < args.size:
            m = preset.ae.downscale
            crops = []
            for img in x:
                top, left = (rng.randrange(0, args.size - args.crop + 1, m) for _ in range(2))
                crops.append(img[:, top : top + args.crop, left : left + args.crop])
            x = torch.stack(crops)
        x = x.to(dev, non_blocking=True)
        lr = cosine_lr(step, args.steps, args.lr, warmup=200)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            with torch.set_grad_enabled(not args.decoder_only):
                mean = ae.encoder(x)[:, :z]
            rec = ae.decoder(mean)
        rec = rec.float()
        # L1 keeps edges crisp; the small latent penalty keeps the scale bounded for the DiT.
        loss = F.l1_loss(rec, x) + 0.5 * F.mse_loss(rec, x)
        if not args.decoder_only:
            loss = loss + 1e-4 * mean.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())
        step += 1
        if step % 50 == 0:
            recent = torch.stack(losses[-50:]).mean().item()  # one host sync per report, not per step
            say(f"ae step {step}/{args.steps} loss {recent:.4f} lr {lr:.2e} "
                f"{(time.perf_counter() - t0) / (step - first):.2f}s/step")
            losses = losses[-50:]
        if step % args.save_every == 0 or step == args.steps:
            _atomic_save({"model": ae.state_dict(), "opt": opt.state_dict(), "step": step}, ck)
    ae.eval().cpu()
    if not args.decoder_only:
        set_latent_stats(ae, preset, args.size, args.seed)
    _atomic_safetensors(ae.state_dict(), out / "ae.safetensors")
    err = reconstruction_error(ae, args.size, args.seed + 1)
    say(f"ae: done, mean abs reconstruction error {err:.4f} (on [-1, 1]); saved {out / 'ae.safetensors'}")
    return ae


@torch.no_grad()
def set_latent_stats(ae: AutoEncoder, preset: ModelPreset, size: int, seed: int, n: int = 1024) -> None:
    """The BatchNorm statistics that normalise patchified latents for the DiT."""
    rng = random.Random(seed + 17)
    ae.bn.running_mean.zero_()
    ae.bn.running_var.fill_(1.0 - preset.ae.bn_eps)
    zs = torch.cat(
        [ae.encode(render_batch([shapes.sample_scene(rng) for _ in range(64)], size)) for _ in range(n // 64)]
    )
    ae.bn.running_mean.copy_(zs.mean(dim=(0, 2, 3)))
    ae.bn.running_var.copy_(zs.var(dim=(0, 2, 3)))
    ae.bn.num_batches_tracked.fill_(n)


@torch.no_grad()
def reconstruction_error(ae: AutoEncoder, size: int, seed: int, n: int = 64) -> float:
    rng = random.Random(seed)
    x = render_batch([shapes.sample_scene(rng) for _ in range(n)], size)
    return float((ae.decode(ae.encode(x)) - x).abs().mean())


# ---------------------------------------------------------------- stage: base (flow matching)


@dataclass
class FlowArgs:
    steps: int = 8000
    batch: int = 32
    lr: float = 4e-4
    warmup: int = 300
    size: int = 128
    seed: int = 0
    caption_dropout: float = 0.1
    # t2i, edit, compose, position drills (see shapes.sample_drill), loose captions (shapes.sample_loose)
    mix: tuple[float, ...] = (0.4, 0.25, 0.1, 0.15, 0.1)
    drill_t: tuple[float, float] = (0.9, 1.0)  # drills teach where objects go, which is decided at the noisy end
    stop_at: int = 0  # stop (with a checkpoint) at this step, keeping the schedule of `steps`; 0: run to the end
    ema: float = 0.999
    save_every: int = 200
    time_shift: float = 2.5
    device: str = "cpu"
    workers: int = 0  # processes drawing the batches ahead (0: drawn in the training process, latents cached)
    init: str = ""  # a folder with dit.safetensors and text_encoder/model.safetensors to start from (no checkpoint)


def init_dit(model: Flux2Transformer) -> None:
    """Zero the modulation and output layers so every block starts as the identity (DiT-style)."""
    with torch.no_grad():
        for lin in (
            model.double_stream_modulation_img.lin,
            model.double_stream_modulation_txt.lin,
            model.single_stream_modulation.lin,
            model.final_layer.adaLN_modulation[1],
            model.final_layer.linear,
        ):
            lin.weight.zero_()


def init_text_encoder(te: Qwen3TextEncoder, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in te.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif "norm" in name:
                p.fill_(1.0)


class Conditioner:
    """Everything the DiT is conditioned on for one batch: text embedding, references, ids."""

    def __init__(self, tok: PromptTokenizer, te: Qwen3TextEncoder, ae: AutoEncoder, preset: ModelPreset, size: int):
        self.tok, self.te, self.ae, self.preset = tok, te, ae, preset
        self.latents = LatentCache(ae, size)

    @property
    def device(self) -> torch.device:
        return self.ae.bn.running_mean.device

    def text(self, prompts: Sequence[str]) -> Tensor:
        ids, mask = self.tok.encode(list(prompts), self.preset.text.max_length)
        return self.te(ids.to(self.device), mask.to(self.device))

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Packed latents of rendered pixels (B, 3, H, W), uint8."""
        return sampling.pack(self.ae.encode(bytes_to_unit(pixels.to(self.device, non_blocking=True))))

    def refs(
        self, sources: Sequence[tuple[shapes.Scene, ...]], pixels: Sequence[Tensor] | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Reference tokens and ids; from `pixels` (one batch per reference) when given, else through the cache."""
        n_refs = len(sources[0])
        if n_refs == 0:
            return None, None
        if pixels is None:
            per_ref = [self.latents([s[i] for s in sources]).to(self.device) for i in range(n_refs)]
        else:
            per_ref = [self.ae.encode(bytes_to_unit(px.to(self.device, non_blocking=True))) for px in pixels]
        toks = torch.cat([sampling.pack(z) for z in per_ref], dim=1)
        ids = sampling.reference_ids([tuple(z.shape[-2:]) for z in per_ref], self.preset.ref_time_offset)
        return toks, ids.to(self.device)


def _load_run_models(run: Path, preset: ModelPreset) -> tuple[PromptTokenizer, AutoEncoder]:
    tok = PromptTokenizer.from_dir(run / "tokenizer")
    ae = AutoEncoder(preset.ae)
    ae.load_state_dict(load_file(str(run / "ae" / "ae.safetensors")))
    return tok, ae.eval().requires_grad_(False)


class FlowData(torch.utils.data.Dataset):
    """The batch of base-training step k, a pure function of (seed, k): examples, prompts after caption dropout,
    noise and times; with `render`, the pixels of targets and references too, so that DataLoader workers take
    the drawing off the training process."""

    def __init__(self, args: FlowArgs, tokens: int, channels: int, render: bool):
        self.args, self.tokens, self.channels, self.render = args, tokens, channels, render

    def __len__(self) -> int:
        return self.args.steps

    def __getitem__(self, step: int) -> dict:
        a = self.args
        rng = random.Random(a.seed * 1_000_003 + step)
        g = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
        b = sample_batch(rng, a.batch, a.mix)
        prompts = ["" if rng.random() < a.caption_dropout else p for p in b.prompts]
        noise = torch.randn((a.batch, self.tokens, self.channels), generator=g)
        if b.kind == "drill":
            lo, hi = a.drill_t
            t = lo + (hi - lo) * torch.rand(a.batch, generator=g)
        else:
            t = sample_t(a.batch, g, a.time_shift)
        item = {"batch": b, "prompts": prompts, "noise": noise, "t": t}
        if self.render:
            item["target_px"] = render_bytes(b.targets, a.size)
            n_refs = len(b.sources[0])
            item["source_px"] = [render_bytes([s[i] for s in b.sources], a.size) for i in range(n_refs)]
        return item


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def flow_batches(data: FlowData, start: int, end: int, workers: int, pin: bool = False) -> Iterator[dict]:
    if workers == 0:
        return (data[k] for k in range(start, end))
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(start, end), num_workers=workers,
                                         prefetch_factor=4, worker_init_fn=_one_thread, persistent_workers=False,
                                         pin_memory=pin)
    return iter(loader)


def load_dit_grown(dit: Flux2Transformer, state: dict[str, Tensor]) -> int:
    """Load a DiT's weights into a model with as many or more single-stream blocks; returns how many were added.

    The added blocks get a zero output projection, so each starts as the identity and the grown model computes
    exactly what the smaller one did: training continues from there with more capacity instead of from scratch.
    """
    ours = dit.state_dict()
    unexpected = [k for k in state if k not in ours]
    if unexpected:
        raise ValueError(f"these weights have tensors this DiT lacks: {unexpected[:3]}...")
    missing = [k for k in ours if k not in state]
    theirs = {int(k.split(".")[1]) for k in state if k.startswith("single_blocks.")}
    n_old = max(theirs) + 1 if theirs else 0
    if any(not k.startswith("single_blocks.") or int(k.split(".")[1]) < n_old for k in missing):
        raise ValueError(f"these weights do not fit this DiT (missing {missing[:3]}...): only single-stream blocks "
                         "can be added; other shapes need a run from scratch")
    dit.load_state_dict(state, strict=False)  # the keys left out are exactly the added blocks (checked above)
    with torch.no_grad():
        for block in dit.single_blocks[n_old:]:
            block.linear2.weight.zero_()
    return len(dit.single_blocks) - n_old


def _load_base_weights(folder: Path, dit: Flux2Transformer, te: Qwen3TextEncoder, say: Log = print) -> None:
    """Weights from a base folder as `train_base` writes it: dit.safetensors and text_encoder/model.safetensors.

    The DiT may have more single-stream blocks than the folder's weights (see `load_dit_grown`).
    """
    files = (folder / "dit.safetensors", folder / "text_encoder" / "model.safetensors")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{folder}: {file} is missing; give a run's base folder (it holds "
                                    "dit.safetensors and text_encoder/model.safetensors)")
    added = load_dit_grown(dit, load_file(str(files[0])))
    if added:
        say(f"{folder}: {added} single-stream blocks added to the DiT (each starts as the identity)")
    te.load_state_dict(load_file(str(files[1])))


def train_base(run: Path, preset: ModelPreset, args: FlowArgs, say: Log = print) -> None:
    out = run / "base"
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    tok, ae = _load_run_models(run, preset)
    ae.to(dev)
    if tok.vocab_size != preset.text.vocab_size:
        raise ValueError(
            f"the run's tokenizer has {tok.vocab_size} tokens but preset {preset.name} expects "
            f"{preset.text.vocab_size}; retrain the tokenizer or update the preset"
        )
    torch.manual_seed(args.seed)
    dit = Flux2Transformer(preset.dit)
    init_dit(dit)
    te = Qwen3TextEncoder(preset.text)
    init_text_encoder(te, args.seed)
    ck = out / "ckpt.pt"
    if args.init and not ck.is_file():
        _load_base_weights(Path(args.init), dit, te, say)
        say(f"base: starting from the weights in {args.init}")
    dit.to(dev)
    te.to(dev)
    params = list(dit.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema_dit, ema_te = EMA(dit, args.ema), EMA(te, args.ema)
    parts = {"dit": dit, "te": te, "ema_dit": ema_dit.shadow, "ema_te": ema_te.shadow, "opt": opt}
    step = _resume(ck, parts, dev, "base", say)
    cond = Conditioner(tok, te, ae, preset, args.size)
    hw = args.size // preset.ae.downscale
    img_ids, txt_ids = sampling.image_ids(hw, hw).to(dev), sampling.text_ids(preset.text.max_length).to(dev)
    data = FlowData(args, hw * hw, preset.ae.latent_channels, render=args.workers > 0)
    dit.train()
    te.train()
    t0, losses, done = time.perf_counter(), [], 0
    end = min(args.stop_at or args.steps, args.steps)
    for item in flow_batches(data, step, end, args.workers, pin=dev.type == "cuda"):
        b: Batch = item["batch"]
        if "target_px" in item:
            x0 = cond.encode(item["target_px"])
            ref_tok, ref_ids = cond.refs(b.sources, item["source_px"])
        else:
            x0 = sampling.pack(cond.latents(b.targets)).to(dev)
            ref_tok, ref_ids = cond.refs(b.sources)
        noise, t = item["noise"].to(dev), item["t"].to(dev)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        lr = cosine_lr(step, args.steps, args.lr, warmup=args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            txt = cond.text(item["prompts"])
            v = dit(xt, img_ids, txt, txt_ids, t, ref=ref_tok, ref_ids=ref_ids)
        loss = F.mse_loss(v.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_dit.update(dit, step)
        ema_te.update(te, step)
        losses.append(loss.detach())  # no .item() per step: it would wait for the device every step
        step += 1
        done += 1
        if step % 50 == 0:
            c = cond.latents
            hit = f", latent cache hits {c.hits / max(1, c.hits + c.misses):.0%}" if args.workers == 0 else ""
            say(f"base step {step}/{args.steps} loss {float(torch.stack(losses[-50:]).mean()):.4f} lr {lr:.2e} "
                f"{(time.perf_counter() - t0) / done:.3f}s/step{hit}")
            losses = losses[-50:]
        if step % args.save_every == 0 or step == end:
            _atomic_save(
                {"dit": dit.state_dict(), "te": te.state_dict(), "ema_dit": ema_dit.shadow.state_dict(),
                 "ema_te": ema_te.shadow.state_dict(), "opt": opt.state_dict(), "step": step},
                ck,
            )
            export_text_encoder(ema_te.shadow, tok, preset, out / "text_encoder")
            _atomic_safetensors(ema_dit.shadow.state_dict(), out / "dit.safetensors", torch.bfloat16)
    say(f"base: done at step {step}")


def export_text_encoder(te: Qwen3TextEncoder, tok: PromptTokenizer, preset: ModelPreset, folder: Path) -> None:
    """A Qwen3-layout folder (config.json, model.safetensors, tokenizer files) the loader reads like a real one."""
    folder.mkdir(parents=True, exist_ok=True)
    c = preset.text
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "note": f"kleinbild {preset.name}: only the layers below {c.layers_to_run} are stored",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _atomic_safetensors(te.state_dict(), folder / "model.safetensors", torch.bfloat16)
    src = tok.source_dir
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((src / name).read_bytes())


# ---------------------------------------------------------------- bundle


def bundle_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "weights" / "nano"


def export_bundle(run: Path, dest: Path | None = None, say: Log = print) -> Path:
    """Assemble the shipped nano folder: both DiTs, the autoencoder and the text encoder with its tokenizer."""
    dest = dest or bundle_dir()
    dest.mkdir(parents=True, exist_ok=True)
    base, nano = get_preset("nano-base"), get_preset("nano")
    parts = {
        run / "base" / "dit.safetensors": dest / base.dit_file,
        run / "distill" / "dit.safetensors": dest / nano.dit_file,
        run / "ae" / "ae.safetensors": dest / base.ae_file,
    }
    for src, dst in parts.items():
        if src.is_file():
            dst.write_bytes(src.read_bytes())
        else:
            say(f"bundle: {src} is not there yet; {dst.name} left as it was")
    te_dst = dest / "text_encoder"
    te_dst.mkdir(exist_ok=True)
    for f in (run / "base" / "text_encoder").glob("*"):
        (te_dst / f.name).write_bytes(f.read_bytes())
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    say(f"bundle: {dest} holds {total / 2**20:.1f} MiB")
    return dest


__all__ = [
    "AEArgs", "FlowArgs", "corpus", "export_bundle", "get_preset", "load_dit_grown", "train_autoencoder",
    "train_base", "train_tokenizer",
]
