"""Continue the nano recipe on a GPU machine inside a fixed time budget, then distil, bundle and evaluate.

Run by tools/gpu_train.sh: the run folder (tokenizer, autoencoder) and the starting weights are in `.gpu/` (built
by tools/gpu_prepare.sh); everything worth keeping is written to $OUT, a few files under 16 MiB each. The step
counts are derived from a short calibration, so the learning-rate schedules fit the budget; the log records them,
and `kleinbild train base --steps N --batch B --init ...` replays the run with those numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kleinbild.config import get_preset
from kleinbild.nano import train
from kleinbild.nano.distill import DistillArgs, train_distill


def _mix(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=".gpu")
    ap.add_argument("--base-seconds", type=float, default=280)
    ap.add_argument("--distill-seconds", type=float, default=100)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cal-steps", type=int, default=150)
    ap.add_argument("--distill-chunks", type=int, default=300)
    ap.add_argument("--distill-batch", type=int, default=64)
    ap.add_argument("--distill-steps", type=int, default=0, help="0: from --distill-seconds")
    ap.add_argument("--student-init", default="", help="start the student from these weights")
    ap.add_argument("--distill-seed", type=int, default=1, help="another seed: other trajectories' examples")
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--eval-n", type=int, default=50)
    ap.add_argument("--eval-base", type=int, default=1, help="0: evaluate the student only (saves GPU time)")
    ap.add_argument("--workers", type=int, default=min(14, (os.cpu_count() or 2) - 2))
    ap.add_argument("--base-mix", type=_mix, default=(0.35, 0.3, 0.15, 0.1, 0.1), help="t2i,edit,compose,drill,loose")
    ap.add_argument("--distill-mix", type=_mix, default=(0.35, 0.3, 0.15, 0.05, 0.15))
    ap.add_argument("--depth-single", type=int, default=0, help="grow the DiT to this many single-stream blocks")
    ap.add_argument("--decoder-seconds", type=float, default=0,
                    help="instead of the DiT stages: fine-tune the autoencoder's decoder for this long")
    ap.add_argument("--decoder-batch", type=int, default=128)
    ap.add_argument("--decoder-lr", type=float, default=5e-4)
    return ap.parse_args()


def main() -> int:
    args = _parse()
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / ("decoder.log" if args.decoder_seconds else "train.log"), "a")  # noqa: SIM115 - whole run

    def say(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    src = Path(args.src)
    preset = get_preset("nano-base")
    if args.depth_single:  # grow: the added single-stream blocks start as the identity (train.load_dit_grown)
        preset = dataclasses.replace(preset, dit=dataclasses.replace(preset.dit, depth_single=args.depth_single))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    say(f"torch {torch.__version__}, {name}, {args.workers} data workers")
    if args.decoder_seconds:
        return decoder(args, src, preset, out, say)

    if args.base_seconds == 0:  # distillation only: the teacher is --src/init as it is
        if not args.distill_steps:
            raise SystemExit("--base-seconds 0 needs --distill-steps (there is no calibration to size it)")
        run = Path(tempfile.mkdtemp())
        shutil.copytree(src / "run", run, dirs_exist_ok=True)
        shutil.copytree(src / "init", run / "base", dirs_exist_ok=True)
        return distill(args, run, preset, out, say, per_step=0.0, base_steps=0)
    run, per_step, steps = base(args, src, preset, out, say)
    return distill(args, run, preset, out, say, per_step=per_step, base_steps=steps)


def base(args: argparse.Namespace, src: Path, preset, out: Path, say) -> tuple[Path, float, int]:
    """Calibrate, then continue the base from --src/init for --base-seconds; the EMA weights go to $OUT.

    Returns the run folder, the measured seconds per step and the step count."""
    # Calibration: the same configuration for a few steps in a scratch run.
    stamps: list[tuple[int, float]] = []

    def cal_say(msg: str) -> None:
        if msg.startswith("base step"):
            stamps.append((int(msg.split()[2].split("/")[0]), time.perf_counter()))
        say("calibration: " + msg)

    cal = Path(tempfile.mkdtemp())  # fresh: a leftover checkpoint would resume instead of calibrating
    shutil.copytree(src / "run", cal, dirs_exist_ok=True)
    common = dict(batch=args.batch, workers=args.workers, device=args.device, mix=args.base_mix, init=str(src / "init"))
    train.train_base(cal, preset, train.FlowArgs(steps=args.cal_steps, save_every=10**9, **common), say=cal_say)
    (s0, t0), (s1, t1) = stamps[0], stamps[-1]  # from the first report on: worker start-up left out
    per_step = (t1 - t0) / (s1 - s0)
    steps = int(args.base_seconds / per_step)
    say(f"calibration: {per_step * 1000:.1f} ms/step at batch {args.batch} -> base {steps} steps")

    run = Path(tempfile.mkdtemp())
    shutil.copytree(src / "run", run, dirs_exist_ok=True)
    t = time.perf_counter()
    base_args = train.FlowArgs(steps=steps, lr=args.lr, warmup=200, save_every=2000, **common)
    say(f"base: {base_args}")
    train.train_base(run, preset, base_args, say=say)
    say(f"base: {time.perf_counter() - t:.0f} s")
    ck = torch.load(run / "base" / "ckpt.pt", weights_only=True, map_location="cpu")
    dit = {k: v.float().contiguous() for k, v in ck["ema_dit"].items()}
    parts: tuple[dict, dict] = ({}, {})  # two files of about equal size: each must stay under 16 MiB
    for k in sorted(dit, key=lambda k: -dit[k].numel()):
        min(parts, key=lambda p: sum(v.numel() for v in p.values()))[k] = dit[k]
    save_file(parts[0], str(out / "ema_dit_a.safetensors"))
    save_file(parts[1], str(out / "ema_dit_b.safetensors"))
    save_file({k: v.float().contiguous() for k, v in ck["ema_te"].items()}, str(out / "ema_te.safetensors"))
    # base/dit.safetensors and text_encoder/ are these EMA weights in bfloat16: $OUT holds at most 8 files
    return run, per_step, steps


def distill(args: argparse.Namespace, run: Path, preset, out: Path, say, per_step: float, base_steps: int) -> int:
    """Distil the 4-step student from run/base, copy it to $OUT as it is saved, then (unless --eval-n 0) evaluate."""
    t = time.perf_counter()
    # A distillation step costs about 0.7 base steps (H200, batch 128 against 256: 90 against 134 ms); the
    # trajectories come on top (200 x 128: ~70 s), so --distill-seconds is the regression alone.
    d_steps = args.distill_steps or max(1, int(args.distill_seconds / (0.7 * per_step)))
    d_args = DistillArgs(chunks=args.distill_chunks, batch=args.distill_batch, steps=d_steps, lr=args.distill_lr,
                         device=args.device, mix=args.distill_mix, seed=args.distill_seed, init=args.student_init)
    say(f"distill: {d_args}")

    def distill_say(msg: str) -> None:
        if "trajectories" not in msg or int(msg.split()[2].split("/")[0]) % 50 in (0, 1):
            say(msg)
        saved = run / "distill" / "dit.safetensors"
        if msg.startswith("distill step") and saved.is_file():  # a killed run still returns its latest student
            shutil.copy(saved, out / "nano_dit.safetensors")

    train_distill(run, preset, d_args, say=distill_say)
    say(f"distill: {time.perf_counter() - t:.0f} s")
    shutil.copy(run / "distill" / "dit.safetensors", out / "nano_dit.safetensors")

    if args.eval_n == 0:
        return 0
    dest = train.export_bundle(run, say=say)  # the package's weights/nano in this copy of the tree
    teacher_keys = load_file(str(run / "base" / "dit.safetensors")).keys()
    assert load_file(str(dest / "flux-2-nano.safetensors")).keys() == teacher_keys
    n_base = str(max(1, args.eval_n * 2 // 5))
    evals = [("nano", ["--n", str(args.eval_n)]), ("nano-base", ["--n", n_base, "--steps", "50"])]
    for model, extra in evals[: 1 + bool(args.eval_base)]:
        cmd = [sys.executable, "-m", "kleinbild", "eval", "-m", model, "--device", args.device, "--json", *extra]
        res = subprocess.run(cmd, capture_output=True, text=True)
        say(res.stdout.strip() + res.stderr.strip()[-2000:])
    say("summary " + json.dumps({"base_steps": base_steps, "distill_steps": d_steps, "ms_per_step": per_step * 1000}))
    return 0


def decoder(args: argparse.Namespace, src: Path, preset, out: Path, say) -> int:
    """Calibrate, then fine-tune the decoder of the run's autoencoder (encoder kept) for --decoder-seconds."""
    start = src / "run" / "ae" / "ae.safetensors"
    stamps: list[tuple[int, float]] = []

    def cal_say(msg: str) -> None:
        if msg.startswith("ae step"):
            stamps.append((int(msg.split()[2].split("/")[0]), time.perf_counter()))
        say("calibration: " + msg)

    common = dict(batch=args.decoder_batch, device=args.device, init=str(start), decoder_only=True,
                  lr=args.decoder_lr, save_every=10**9)
    train.train_autoencoder(Path(tempfile.mkdtemp()), preset, train.AEArgs(steps=150, **common), say=cal_say)
    (s0, t0), (s1, t1) = stamps[0], stamps[-1]
    per_step = (t1 - t0) / (s1 - s0)
    steps = int(args.decoder_seconds / per_step)
    say(f"calibration: {per_step * 1000:.1f} ms/step at batch {args.decoder_batch} -> decoder {steps} steps")
    run = Path(tempfile.mkdtemp())
    dec_args = train.AEArgs(steps=steps, seed=3, **{**common, "save_every": 1000})
    say(f"decoder: {dec_args}")

    def dec_say(msg: str) -> None:
        if not msg.startswith("ae step") or int(msg.split()[2].split("/")[0]) % 500 == 0:
            say(msg)

    t = time.perf_counter()
    train.train_autoencoder(run, preset, dec_args, say=dec_say)
    say(f"decoder: {time.perf_counter() - t:.0f} s")
    shutil.copy(run / "ae" / "ae.safetensors", out / "ae.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
