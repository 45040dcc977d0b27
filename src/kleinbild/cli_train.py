"""`kleinbild train`: the nano recipe's stages and LoRA training, a thin shell like the rest of the CLI."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

_MIX_KINDS = ("t2i", "edit", "compose", "drill", "loose", "plain")


def _mix(text: str) -> tuple[float, ...]:
    """Batch-kind weights "t2i,edit,compose[,drill[,loose[,plain]]]", e.g. 0.2,0.6,0.1,0.05,0.05."""
    try:
        weights = tuple(float(v) for v in text.split(","))
    except ValueError:
        weights = ()
    if not 3 <= len(weights) <= len(_MIX_KINDS) or min(weights) < 0 or sum(weights) <= 0:
        raise argparse.ArgumentTypeError(
            f"mix must be 3 to 6 non-negative weights for {','.join(_MIX_KINDS)} (not all zero), got {text!r}"
        )
    return weights


def add_parser(sub: Any, positive_int: Callable[[str], int], seed: Callable[[str], int]) -> None:
    t = sub.add_parser("train", help="train the nano models on the shapes world (CPU-friendly, resumable), or a LoRA "
                       "(train lora --base MODEL --data DIR --out DIR)")
    t.add_argument("stage", choices=["tokenizer", "ae", "base", "distill", "bundle", "all", "lora", "lora-data",
                                     "lora-eval"])
    t.add_argument("--run", default="runs/nano", help="run folder: checkpoints and outputs (default: runs/nano)")
    t.add_argument("--steps", type=positive_int, help="training steps of the stage (default: the recipe's)")
    t.add_argument("--batch", type=positive_int, help="batch size (default: the recipe's)")
    t.add_argument("--seed", type=seed, default=0)
    t.add_argument("--lr", type=float, help="peak learning rate of the stage (default: the recipe's; lora: 5e-4)")
    t.add_argument("--mix", type=_mix, help="base, distill: weights of the batch kinds t2i,edit,compose,drill,loose"
                   ",plain (default: the recipe's; e.g. 0.2,0.6,0.1,0.05,0.05 for an edit-heavy continuation)")
    t.add_argument("--image-guidance", type=float, help="distill: the teacher's guidance towards the reference "
                   "images on edit and composition batches (default: the recipe's; 1 is plain CFG)")
    t.add_argument("--chunks", type=positive_int, help="distill: teacher trajectory batches to record")
    t.add_argument("--on-policy", type=float, help="distill: fraction of steps trained on the student's own "
                   "rollouts, the teacher's guided velocity there as the target (0 to 1; default 0)")
    t.add_argument("--plain-substeps", type=positive_int, help="distill: teacher Euler steps per student step on "
                   "trajectories of captions that leave size and position free (plain, loose; default 1)")
    t.add_argument("--stop-at", type=positive_int, help="base: stop at this step (a checkpoint is written), keeping "
                   "the learning-rate schedule of --steps; resume later with a larger value")
    t.add_argument("--workers", type=positive_int, help="base: processes that draw the batches ahead (worth it "
                   "on a GPU machine; default: none, batches drawn in the training process with a latent cache)")
    t.add_argument("--init", help="start a new run from these weights instead of from scratch: base: a run's "
                   "base folder (dit.safetensors and text_encoder/); distill: a student dit.safetensors; ae: an "
                   "ae.safetensors")
    t.add_argument("--decoder-only", action="store_true", help="ae: train the decoder alone from --init (the "
                   "encoder and latent statistics stay, so DiTs trained on them stay valid)")
    t.add_argument("--bundle-to", help="bundle: destination folder (default: the package's weights/nano)")
    t.add_argument("--device", help="lora, base, distill: cpu, cuda, ... (default: lora the best available, "
                   "base and distill the CPU)")
    _lora_training_flags(t.add_argument_group("LoRA (stages lora, lora-data, lora-eval)"), positive_int)


def _lora_training_flags(lo: Any, positive_int: Callable[[str], int]) -> None:
    lo.add_argument("--base", default="nano-base", help="lora: the model to adapt (default: nano-base)")
    lo.add_argument("--data", help="lora: folder of images with NAME.txt captions, or a metadata.jsonl; "
                    "lora-data: where to write the concept examples")
    lo.add_argument("--out", help="lora: output folder (checkpoints, samples, lora.safetensors)")
    lo.add_argument("--rank", type=positive_int, default=16)
    lo.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank)")
    lo.add_argument("--targets", choices=["blocks", "attn"], default="blocks")
    lo.add_argument("--size", type=positive_int, help="training side in px (default: the model's default size)")
    lo.add_argument("--save-every", type=positive_int, default=100)
    lo.add_argument("--sample-prompt", help="prompt of the sample image saved with each checkpoint")
    lo.add_argument("--caption-dropout", type=float, help="lora: share of empty prompts (default 0.1)")
    lo.add_argument("--lora", help="lora-eval: the trained adapter")
    lo.add_argument("--concept", default="bar",
                    help="lora-data / lora-eval: the concept shape (bar, ring, cross, diamond)")
    lo.add_argument("-n", type=positive_int, default=20, help="lora-data / lora-eval: examples")
    lo.add_argument("--prior", type=int, default=0, help="lora-data: also write this many ordinary shapes-world "
                    "examples (prior preservation: unrelated prompts stay as they were)")
    lo.add_argument("--prior-images", choices=["render", "model"], default="render",
                    help="lora-data: prior images drawn by the world's renderer (default), or generated by --base "
                    "(DreamBooth's way; measured no better here, see docs/lora.md)")


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from kleinbild.config import get_preset
    from kleinbild.nano import distill, train

    run = Path(args.run)
    base = get_preset("nano-base")

    def with_overrides(cfg):
        given = (("steps", args.steps), ("batch", args.batch), ("chunks", args.chunks), ("lr", args.lr),
                 ("stop_at", args.stop_at), ("device", args.device), ("workers", args.workers),
                 ("init", args.init), ("decoder_only", args.decoder_only), ("mix", args.mix),
                 ("image_guidance", args.image_guidance), ("on_policy", args.on_policy),
                 ("plain_substeps", args.plain_substeps))
        over = {k: v for k, v in given if v is not None}  # 0 is a value (and refused by the stage), not absent
        over = {k: v for k, v in over.items() if k in {f.name for f in dataclasses.fields(cfg)}}
        return dataclasses.replace(cfg, seed=args.seed, **over)

    def say(msg: str) -> None:
        print(msg, flush=True)

    if args.stage.startswith("lora"):
        return _train_lora(args)
    stages = ["tokenizer", "ae", "base", "distill", "bundle"] if args.stage == "all" else [args.stage]
    for stage in stages:
        if stage == "tokenizer":
            train.train_tokenizer(run / "tokenizer", seed=args.seed, say=say)
        elif stage == "ae":
            train.train_autoencoder(run, base, with_overrides(train.AEArgs()), say=say)
        elif stage == "base":
            train.train_base(run, base, with_overrides(train.FlowArgs()), say=say)
        elif stage == "distill":
            distill.train_distill(run, base, with_overrides(distill.DistillArgs()), say=say)
        elif stage == "bundle":
            train.export_bundle(run, Path(args.bundle_to) if args.bundle_to else None, say=say)
    return 0


def _train_lora(args: argparse.Namespace) -> int:
    from kleinbild import train_lora as tl
    from kleinbild.loading import LoadOptions
    from kleinbild.nano import concepts

    def say(msg: str) -> None:
        print(msg, flush=True)

    if args.stage == "lora-data":
        if not args.data:
            raise ValueError("lora-data needs --data DIR: where to write the concept examples")
        prior_pipe = None
        if args.prior_images == "model" and args.prior:
            from kleinbild.pipeline import KleinPipeline

            prior_pipe = KleinPipeline.from_pretrained(args.base, LoadOptions(device=args.device))
        folder = concepts.make_concept_data(Path(args.data), args.concept, n=args.n, seed=args.seed, prior=args.prior,
                                      prior_pipe=prior_pipe)
        print(folder)
        return 0
    if args.stage == "lora-eval":
        from kleinbild.pipeline import KleinPipeline

        if not args.lora:
            raise ValueError("lora-eval needs --lora FILE (the trained adapter)")
        pipe = KleinPipeline.from_pretrained(args.base, LoadOptions(device=args.device, loras=(args.lora,)))
        report = concepts.concept_eval(pipe, args.concept, n=args.n, seed=1000 + args.seed)
        print(json.dumps(report, indent=2))
        return 0
    if not args.data or not args.out:
        raise ValueError("train lora needs --data DIR (captioned images) and --out DIR")
    fields = dict(rank=args.rank, alpha=args.alpha, lr=args.lr or 5e-4, targets=args.targets, size=args.size,
                  save_every=args.save_every, sample_prompt=args.sample_prompt, seed=args.seed)
    if args.caption_dropout is not None:
        fields["caption_dropout"] = args.caption_dropout
    if args.steps:
        fields["steps"] = args.steps
    if args.batch:
        fields["batch"] = args.batch
    tl.train_lora(args.base, Path(args.data), Path(args.out), tl.LoraArgs(**fields), say=say,
                  load_options=LoadOptions(device=args.device))
    return 0
