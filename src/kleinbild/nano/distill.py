"""Distilling the nano base into the 4-step student: teacher trajectories, then velocity regression.

The teacher is the base stage's model with classifier-free (and reference) guidance; its solutions are recorded at
the student's timesteps, and the student learns to jump from each of its states to the next. Like the other stages
(`kleinbild.nano.train`), the data of step k depends only on the seed and k, and a run resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from kleinbild import sampling
from kleinbild.config import ModelPreset, get_preset
from kleinbild.nano.train import (
    EMA,
    Batch,
    Conditioner,
    Log,
    _atomic_safetensors,
    _atomic_save,
    _load_base_weights,
    _load_run_models,
    _resume,
    cosine_lr,
    load_dit_grown,
    sample_batch,
)
from kleinbild.text_encoder import Qwen3TextEncoder
from kleinbild.transformer import Flux2Transformer

FREE_KINDS = ("loose", "plain")  # batch kinds whose captions leave size and position to the model


@dataclass
class DistillArgs:
    chunks: int = 200  # teacher trajectory batches of `batch` examples each (~3.5 s each on 2 cores)
    batch: int = 32
    # Teacher Euler steps inside each student step. 1: the student learns the CFG teacher's velocity at the
    # teacher's own 4-step states, which on the shift-2 grid is as good as 16 teacher steps (edits 0.64 vs 0.66,
    # two objects 0.86 vs 0.86, n=50) and far easier to learn than a 16-step jump.
    substeps: int = 1
    # The same for chunks of captions that leave size and position free (plain, loose). There the 4-step teacher
    # collapses to an empty background more often than a finer one does (nano-base, CFG 2, plain n=100: 0.33 at 4
    # steps, 0.43 at 16), so its finer solution is the better target despite the harder jump.
    plain_substeps: int = 1
    guidance: float = 2.0  # the base's best CFG on the eval (edits 0.60 vs 0.52 at 4)
    # Guidance towards the references on batches that have them: v = v(-, -) + image_guidance * (v(-, ref) - v(-, -))
    # + guidance * (v(text, ref) - v(-, ref)), "-" meaning no text / no references; 1 is plain CFG. The 4-step
    # teacher's edits at n=200: 0.62 at 1, 0.655 at 1.3, 0.685 at 1.5, 0.68 at 1.8 (kept objects stay crisper).
    image_guidance: float = 1.5
    steps: int = 1500
    lr: float = 1e-4
    size: int = 128
    seed: int = 5
    mix: tuple[float, ...] = (0.3, 0.45, 0.15, 0.05, 0.05)  # t2i, edit, compose, drill, loose
    ema: float = 0.998
    save_every: int = 200
    device: str = "cpu"
    init: str = ""  # a student dit.safetensors to start from (e.g. the previous nano) instead of the teacher
    # Fraction of steps whose states come from the student's own 4-step rollout (fresh examples, no grad), with the
    # teacher's guided velocity computed there as the target: the student learns to recover from its own drift,
    # which the recorded teacher trajectories never show it. Each such step costs ~2.4x a recorded one (3.1 s vs 1.3 s).
    on_policy: float = 0.0


def refine(timesteps: Sequence[float], k: int) -> list[float]:
    """Split every interval of a schedule into k equal parts (the teacher's finer grid)."""
    out = [timesteps[0]]
    for a, b in zip(timesteps[:-1], timesteps[1:], strict=True):
        out += [a + (b - a) * (j + 1) / k for j in range(k)]
    return out


def _teacher(run: Path, preset: ModelPreset, dev: torch.device) -> tuple[Flux2Transformer, Qwen3TextEncoder]:
    dit, te = Flux2Transformer(preset.dit), Qwen3TextEncoder(preset.text)
    _load_base_weights(run / "base", dit, te)
    return dit.float().eval().requires_grad_(False).to(dev), te.float().eval().requires_grad_(False).to(dev)


def _chunk_batch(args: DistillArgs, c: int) -> tuple[Batch, Tensor]:
    """The examples and noise of trajectory chunk c, regenerated from the seed (only the states are stored)."""
    rng = random.Random(args.seed * 7_000_001 + c)
    g = torch.Generator().manual_seed(args.seed * 7_000_001 + c)
    b = sample_batch(rng, args.batch, args.mix)
    return b, g


def teacher_velocity(
    dit: Flux2Transformer, x: Tensor, t: Tensor, txt: Tensor, ref_tok: Tensor | None, ref_ids: Tensor | None,
    img_ids: Tensor, txt_ids: Tensor, args: DistillArgs,
) -> Tensor:
    """The teacher's guided velocity at states x (n of them; txt holds n empty prompts, then the n prompts).

    v = v(-, -) + image_guidance * (v(-, ref) - v(-, -)) + guidance * (v(text, ref) - v(-, ref)), where "-" is no
    text / no references; without references, or at image_guidance 1, this is plain CFG (one pass fewer).
    """
    n = x.shape[0]
    ref2 = None if ref_tok is None else torch.cat([ref_tok, ref_tok])
    v = dit(torch.cat([x, x]), img_ids, txt, txt_ids, torch.cat([t, t]), ref=ref2, ref_ids=ref_ids).float()
    guided = sampling.cfg_combine(v, args.guidance)
    if ref_tok is not None and args.image_guidance != 1.0:
        bare = dit(x, img_ids, txt[:n], txt_ids, t).float()
        guided = guided + (args.image_guidance - 1.0) * (v[:n] - bare)
    return guided


def make_trajectories(
    run: Path, preset: ModelPreset, args: DistillArgs, student: ModelPreset, say: Log = print
) -> None:
    """Teacher (base, CFG) solutions recorded at the student's timesteps: (B, student_steps + 1, N, C)."""
    if not args.image_guidance > 0:
        raise ValueError(f"image_guidance must be > 0 (1 is plain CFG), got {args.image_guidance}")
    out = run / "distill" / "traj"
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    tok, ae = _load_run_models(run, preset)
    dit, te = _teacher(run, preset, dev)
    cond = Conditioner(tok, te, ae.to(dev), preset, args.size)
    hw = args.size // preset.ae.downscale
    student_t = sampling.schedule(student.default_steps, hw * hw, student.schedule_shift)
    img_ids, txt_ids = sampling.image_ids(hw, hw).to(dev), sampling.text_ids(preset.text.max_length).to(dev)
    t0 = time.perf_counter()
    done = 0
    for c in range(args.chunks):
        path = out / f"{c:05d}.pt"
        if path.is_file():
            continue
        b, g = _chunk_batch(args, c)
        sub = args.plain_substeps if b.kind in FREE_KINDS else args.substeps
        fine = refine(student_t, sub)
        n = len(b.prompts)
        noise = torch.randn((n, hw * hw, preset.ae.latent_channels), generator=g).to(dev)
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16):
            txt = cond.text(["" for _ in range(n)] + b.prompts)
            ref_tok, ref_ids = cond.refs(b.sources)
            states = [noise]
            x = noise.clone()
            for i, (t, t_next) in enumerate(zip(fine[:-1], fine[1:], strict=True)):
                tv = torch.full((n,), t, device=dev)
                guided = teacher_velocity(dit, x, tv, txt, ref_tok, ref_ids, img_ids, txt_ids, args)
                x = x + (t_next - t) * guided
                if (i + 1) % sub == 0:
                    states.append(x.clone())
        _atomic_save(torch.stack(states, dim=1).to(torch.bfloat16).cpu(), path)
        done += 1
        say(f"distill: trajectories {c + 1}/{args.chunks} ({b.kind}) {(time.perf_counter() - t0) / done:.1f}s/chunk")


def train_distill(run: Path, preset: ModelPreset, args: DistillArgs, say: Log = print) -> None:
    """Regress the student's velocity at each of its own timesteps onto the teacher's jump to the next one."""
    if not 0 <= args.on_policy <= 1:  # before the trajectories, so a bad value costs nothing
        raise ValueError(f"on_policy is a fraction of the steps, 0 to 1; got {args.on_policy}")
    out = run / "distill"
    student_preset = get_preset("nano")
    steps_student = student_preset.default_steps
    make_trajectories(run, preset, args, student_preset, say)
    dev = torch.device(args.device)
    tok, ae = _load_run_models(run, preset)
    teacher, te = _teacher(run, preset, dev)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    if args.init:
        load_dit_grown(student, load_file(args.init))  # a 4-step student already: far fewer steps needed
        say(f"distill: student starts from {args.init}")
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = EMA(student, args.ema)
    ck = out / "ckpt.pt"
    step = _resume(ck, {"dit": student, "ema": ema.shadow, "opt": opt}, dev, "distill", say)
    cond = Conditioner(tok, te, ae.to(dev), preset, args.size)
    hw = args.size // preset.ae.downscale
    ts = torch.tensor(sampling.schedule(steps_student, hw * hw, student_preset.schedule_shift), device=dev)
    img_ids, txt_ids = sampling.image_ids(hw, hw).to(dev), sampling.text_ids(preset.text.max_length).to(dev)
    t0, losses = time.perf_counter(), []
    while step < args.steps:
        rng = random.Random(args.seed * 9_000_011 + step)
        c = rng.randrange(args.chunks)
        if args.on_policy > 0 and rng.random() < args.on_policy:  # no draw at 0: recorded runs replay
            b, x, i, target, txt, ref_tok, ref_ids = _on_policy_batch(
                args, step, ema.shadow, teacher, cond, ts, img_ids, txt_ids, hw, preset.ae.latent_channels, dev)
        else:
            b, _ = _chunk_batch(args, c)
            states = torch.load(out / "traj" / f"{c:05d}.pt", weights_only=True).float().to(dev)
            n = states.shape[0]
            i = torch.tensor(rng.choices(range(steps_student), k=n), device=dev)
            x = states[torch.arange(n, device=dev), i]
            target = (states[torch.arange(n, device=dev), i + 1] - x) / (ts[i + 1] - ts[i])[:, None, None]
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
                txt = cond.text(b.prompts)
                ref_tok, ref_ids = cond.refs(b.sources)
        lr = cosine_lr(step, args.steps, args.lr, warmup=100)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            v = student(x, img_ids, txt, txt_ids, ts[i], ref=ref_tok, ref_ids=ref_ids)
        loss = F.mse_loss(v.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema.update(student, step)
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            say(f"distill step {step}/{args.steps} loss {np.mean(losses[-50:]):.4f} lr {lr:.2e} "
                f"{(time.perf_counter() - t0) / len(losses):.2f}s/step")
        if step % args.save_every == 0 or step == args.steps:
            _atomic_save({"dit": student.state_dict(), "ema": ema.shadow.state_dict(), "opt": opt.state_dict(),
                          "step": step}, ck)
            _atomic_safetensors(ema.shadow.state_dict(), out / "dit.safetensors", torch.bfloat16)
    say(f"distill: done at step {step}")


def _on_policy_batch(
    args: DistillArgs, step: int, rollout: Flux2Transformer, teacher: Flux2Transformer, cond: Conditioner,
    ts: Tensor, img_ids: Tensor, txt_ids: Tensor, hw: int, channels: int, dev: torch.device,
) -> tuple[Batch, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Fresh examples (a function of the seed and the step), states from the student's own rollout (its EMA),
    and the teacher's guided velocity at those states as the target."""
    rng = random.Random(args.seed * 11_000_027 + step)
    g = torch.Generator().manual_seed(args.seed * 11_000_027 + step)
    b = sample_batch(rng, args.batch, args.mix)
    n, steps = len(b.prompts), len(ts) - 1
    i = torch.tensor([rng.randrange(steps) for _ in range(n)], device=dev)
    x = torch.randn((n, hw * hw, channels), generator=g).to(dev)
    rows = torch.arange(n, device=dev)
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        txt = cond.text(["" for _ in range(n)] + b.prompts)
        ref_tok, ref_ids = cond.refs(b.sources)
        states = [x]
        for k in range(int(i.max())):
            tv = torch.full((n,), float(ts[k]), device=dev)
            v = rollout(x, img_ids, txt[n:], txt_ids, tv, ref=ref_tok, ref_ids=ref_ids).float()
            x = x + float(ts[k + 1] - ts[k]) * v
            states.append(x)
        x = torch.stack(states, dim=1)[rows, i]
        target = teacher_velocity(teacher, x, ts[i], txt, ref_tok, ref_ids, img_ids, txt_ids, args)
    return b, x, i, target, txt[n:], ref_tok, ref_ids


__all__ = [
    "DistillArgs",
    "make_trajectories",
    "refine",
    "teacher_velocity",
    "train_distill",
]
