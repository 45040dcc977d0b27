"""LoRA training on a folder of captioned images (or edit pairs), and the tools to show that it teaches a concept.

`train_lora` keeps the base model frozen and trains rank-r adapters on the transformer's block linears with the
flow-matching loss of the base stage (`kleinbild.nano.train`). Each checkpoint writes the optimiser state (`ckpt.pt`),
the adapter in the diffusers/PEFT format (`lora-STEP.safetensors`, loadable by diffusers' `load_lora_weights`,
ComfyUI and kleinbild) and a sample image; a run resumes from its last checkpoint. The data of step k depends only
on the seed and k, so a resumed run continues exactly.

Data folder: images (`.png`, `.jpg`, `.jpeg`, `.webp`) each with a caption in a `.txt` of the same name, or a
`metadata.jsonl` with one object per line: `{"file_name": "out.png", "text": "make it pink", "references":
["in.png"]}` (references make it an edit pair; "caption" or "prompt" may stand for "text").

Concept demo: `make_concept_data` renders shapes-world scenes with a shape the world does not have (a bar by
default) and captions that name it; `concept_eval` measures with the shapes analyser and shape templates that the
new shape appears where and as prompted, and that prompts without it come out as before.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn

from kleinbild import lora, sampling
from kleinbild.images import to_tensor
from kleinbild.nano import shapes

log = logging.getLogger(__name__)

Log = Callable[[str], None]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_BLOCK_LINEAR = re.compile(
    r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|single_blocks\.\d+\.linear[12])$"
)
_ATTN_LINEAR = re.compile(r"^(double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\.linear[12])$")
TARGETS = {"blocks": _BLOCK_LINEAR, "attn": _ATTN_LINEAR}


@dataclass
class LoraArgs:
    rank: int = 16
    alpha: float | None = None  # default: the rank (scale 1)
    targets: str = "blocks"  # blocks: every block linear; attn: qkv/proj (double) and linear1/linear2 (single)
    steps: int = 600
    batch: int = 4
    lr: float = 5e-4
    warmup: int = 20
    size: int | None = None  # square training side; default the preset's default size
    seed: int = 0
    save_every: int = 100
    caption_dropout: float = 0.1  # some empty prompts, so CFG's unconditional branch stays consistent
    time_shift: float | None = None  # default: the inference schedule's shift at this size
    grad_clip: float = 1.0
    autocast: bool = True  # bf16 autocast for the frozen model (CPU and CUDA); adapters stay float32
    sample_prompt: str | None = None  # default: the first caption
    sample_steps: int | None = None
    sample_seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if self.targets not in TARGETS:
            raise ValueError(f"unknown LoRA targets {self.targets!r}; choose one of: {', '.join(TARGETS)}")
        for name in ("steps", "batch", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str
    references: tuple[Path, ...] = ()


def load_dataset(folder: Path | str) -> list[Example]:
    """The examples of a data folder (see the module docstring); errors name the files that lack captions."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"data folder {str(folder)!r} does not exist")
    meta = folder / "metadata.jsonl"
    out: list[Example] = []
    if meta.is_file():
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["file_name"]
                text = row.get("text", row.get("caption", row.get("prompt")))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ValueError(f"{meta} line {n}: expected a JSON object with file_name and text") from None
            if not isinstance(text, str):
                raise ValueError(f"{meta} line {n}: no text (caption) for {name!r}")
            refs = tuple(folder / r for r in row.get("references", []) or [])
            out.append(Example(folder / name, text.strip(), refs))
    else:
        missing = []
        for img in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            txt = img.with_suffix(".txt")
            if txt.is_file():
                out.append(Example(img, txt.read_text().strip()))
            else:
                missing.append(img.name)
        if missing:
            raise ValueError(f"{folder}: images without a caption file (NAME.txt): {missing[:10]}")
    absent = [str(p) for ex in out for p in (ex.image, *ex.references) if not p.is_file()]
    if absent:
        raise ValueError(f"{folder}: files named in the data do not exist: {absent[:10]}")
    if not out:
        raise ValueError(f"{folder} holds no training images (captioned .png/.jpg/.webp, or a metadata.jsonl)")
    return out


def _square(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size` and centre-crop to a square."""
    img = img.convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    if (w, h) != (size, size):
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.LANCZOS)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


# ---------------------------------------------------------------- the adapter being trained


class TrainableLora(nn.Module):
    """Rank-r A/B pairs for a set of linear layers; B starts at zero so step 0 is the base model."""

    def __init__(self, layers: dict[str, tuple[int, int]], rank: int, alpha: float, seed: int):
        super().__init__()
        self.rank, self.alpha = rank, float(alpha)
        self.names = sorted(layers)
        g = torch.Generator().manual_seed(seed)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name in self.names:
            out, inp = layers[name]
            # PEFT's initialisation of A: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / math.sqrt(inp)
            self.A[self._key(name)] = nn.Parameter(torch.empty(rank, inp).uniform_(-bound, bound, generator=g))
            self.B[self._key(name)] = nn.Parameter(torch.zeros(out, rank))

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "-")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def entries(self) -> dict[str, tuple[Tensor, Tensor, float]]:
        return {n: (self.A[self._key(n)], self.B[self._key(n)], self.scale) for n in self.names}

    def weights(self) -> lora.LoraWeights:
        mods = {n: lora.LoraModule(self.A[self._key(n)].detach().float().cpu(),
                                   self.B[self._key(n)].detach().float().cpu(), self.scale) for n in self.names}
        return lora.LoraWeights(mods, "kleinbild")


def _atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth (the schedule of `kleinbild.nano.train`)."""
    decay = 0.1 + 0.45 * (1 + math.cos(math.pi * min(step, total) / total))
    return base * min(1.0, (step + 1) / max(1, warmup)) * decay


@dataclass
class _Prepared:
    """Encoded data: per example, target tokens, reference tokens/ids, prompt embedding; and the empty prompt's."""

    x0: list[Tensor]
    refs: list[tuple[Tensor, Tensor] | None]
    txt: list[Tensor]
    empty: Tensor
    groups: dict[int, list[int]] = field(default_factory=dict)


def _prepare(pipe: Any, examples: Sequence[Example], size: int) -> _Prepared:
    m = pipe.preset.ae.downscale
    x0, refs, txt = [], [], []
    captions = [ex.caption for ex in examples]
    emb = torch.cat([pipe.encode_prompt(captions[i : i + 16]) for i in range(0, len(captions), 16)])
    empty = pipe.encode_prompt([""])
    with torch.no_grad():
        for ex in examples:
            img = to_tensor(_square(Image.open(ex.image), size)).to(pipe.device, pipe.dtype)
            x0.append(sampling.pack(pipe.autoencoder.encode(img)).float()[0].clone())
            if ex.references:
                lats = [pipe.autoencoder.encode(to_tensor(_square(Image.open(r), size)).to(pipe.device, pipe.dtype))
                        for r in ex.references]
                tok = torch.cat([sampling.pack(z) for z in lats], dim=1).float()[0].clone()
                ids = sampling.reference_ids([(size // m, size // m)] * len(lats), pipe.preset.ref_time_offset)
                refs.append((tok, ids.to(pipe.device)))
            else:
                refs.append(None)
    # Outside inference mode, so the training graph may use them.
    txt = [e.clone() for e in emb]
    prep = _Prepared(x0, refs, txt, empty[0].clone())
    for i, ex in enumerate(examples):
        prep.groups.setdefault(len(ex.references), []).append(i)
    return prep


def _targets(pipe: Any, which: str) -> dict[str, tuple[int, int]]:
    layers = {n: s for n, s in lora.linear_layers(pipe.transformer).items() if TARGETS[which].match(n)}
    if not layers:
        raise ValueError(f"no layers of this transformer match the LoRA targets {which!r}")
    return layers


def train_lora(
    base: Any,
    data: Path | str,
    out: Path | str,
    args: LoraArgs,
    say: Log = print,
    load_options: dict[str, Any] | None = None,
) -> Path:
    """Train a LoRA on `base` (a KleinPipeline, or anything `KleinPipeline.from_pretrained` takes) and return the
    path of the final adapter (`out/lora.safetensors`)."""
    from kleinbild.pipeline import KleinPipeline

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    examples = load_dataset(data)
    if isinstance(base, KleinPipeline):
        pipe = base
    else:
        from kleinbild.pipeline import pick_device

        opts = dict(load_options or {})
        # float32 on CPU (bf16 autocast does the speed); bf16 weights on a GPU, where memory is what runs out.
        opts.setdefault("dtype", "float32" if pick_device(opts.get("device")).type == "cpu" else "bfloat16")
        pipe = KleinPipeline.from_pretrained(base, **opts)
    if pipe.quant:
        raise ValueError("train LoRAs on an unquantized base (the adapter is saved for the full-precision model)")
    size = args.size or pipe.preset.default_size
    m = pipe.preset.ae.downscale
    if size % m or size < 64:
        raise ValueError(f"training size {size} must be a multiple of {m} and at least 64")
    hw = size // m
    shift = args.time_shift or math.exp(sampling.empirical_mu(hw * hw, pipe.preset.default_steps))
    alpha = float(args.alpha if args.alpha is not None else args.rank)

    t0 = time.perf_counter()
    prep = _prepare(pipe, examples, size)
    say(f"lora: {len(examples)} examples at {size}px encoded in {time.perf_counter() - t0:.1f}s")

    layers = _targets(pipe, args.targets)
    adapter = TrainableLora(layers, args.rank, alpha, args.seed).to(pipe.device)
    opt = torch.optim.AdamW(adapter.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step = 0
    ck = out / "ckpt.pt"
    if ck.is_file():
        state = torch.load(ck, map_location=pipe.device, weights_only=True)
        saved = state.get("shape", {})
        now = {"rank": args.rank, "alpha": alpha, "targets": args.targets, "layers": adapter.names}
        if saved != now:
            raise ValueError(
                f"{out} holds a run with rank {saved.get('rank')}, alpha {saved.get('alpha')}, targets "
                f"{saved.get('targets')!r}; resume with the same settings or choose another --out"
            )
        adapter.load_state_dict(state["lora"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        say(f"lora: resumed at step {step}")
    host = lora.host(pipe.transformer)
    name = host.add(adapter.entries(), 1.0, name="training", source=str(out))
    dit = pipe.transformer
    txt_ids = sampling.text_ids(prep.empty.shape[0]).to(pipe.device)
    img_ids = sampling.image_ids(hw, hw).to(pipe.device)
    kinds = sorted(prep.groups)
    sample_prompt = args.sample_prompt or examples[0].caption
    use_autocast = args.autocast and pipe.device.type in ("cpu", "cuda")
    (out / "args.json").write_text(json.dumps({**asdict(args), "alpha": alpha, "data": str(data)}, indent=2))
    try:
        losses: list[float] = []
        t_start = time.perf_counter()
        while step < args.steps:
            rng = random.Random(args.seed * 1_000_003 + step)
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            kind = kinds[rng.randrange(len(kinds))]
            pool = prep.groups[kind]
            idx = [pool[rng.randrange(len(pool))] for _ in range(args.batch)]
            x0 = torch.stack([prep.x0[i] for i in idx])
            txt = torch.stack([prep.empty if rng.random() < args.caption_dropout else prep.txt[i] for i in idx])
            ref_tok = ref_ids = None
            if kind:
                ref_tok = torch.stack([prep.refs[i][0] for i in idx])  # type: ignore[index]
                ref_ids = prep.refs[idx[0]][1]  # type: ignore[index]
            noise = torch.randn(x0.shape, generator=g).to(pipe.device)
            u = torch.sigmoid(torch.randn(len(idx), generator=g))
            t = (shift * u / (1 + (shift - 1) * u)).to(pipe.device)
            xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
            lr = _lr(step, args.steps, args.lr, args.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            dt = pipe.dtype
            with torch.autocast(pipe.device.type, dtype=torch.bfloat16, enabled=use_autocast):
                v = dit(xt.to(dt), img_ids, txt.to(dt), txt_ids, t, ref=None if ref_tok is None else ref_tok.to(dt),
                        ref_ids=ref_ids)
            loss = F.mse_loss(v.float(), noise - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adapter.parameters(), args.grad_clip)
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % 10 == 0 or step == args.steps:
                say(f"lora step {step}/{args.steps} loss {np.mean(losses[-10:]):.4f} lr {lr:.2e} "
                    f"{(time.perf_counter() - t_start) / len(losses):.2f}s/step")
            if step % args.save_every == 0 or step == args.steps:
                _checkpoint(pipe, adapter, opt, step, out, args, alpha, sample_prompt, size, say)
    finally:
        host.remove(name)
    final = out / "lora.safetensors"
    last = out / f"lora-{step:06d}.safetensors"
    if last.is_file():
        final.write_bytes(last.read_bytes())
    say(f"lora: done at step {step}; adapter {final}")
    return final


def _checkpoint(pipe: Any, adapter: TrainableLora, opt: torch.optim.Optimizer, step: int, out: Path, args: LoraArgs,
                alpha: float, prompt: str, size: int, say: Log) -> None:
    shape = {"rank": args.rank, "alpha": alpha, "targets": args.targets, "layers": adapter.names}
    _atomic_torch_save({"lora": adapter.state_dict(), "opt": opt.state_dict(), "step": step, "shape": shape},
                       out / "ckpt.pt")
    path = lora.save_lora(adapter.weights(), out / f"lora-{step:06d}.safetensors", pipe.transformer, "diffusers",
                          alpha=alpha)
    (out / "samples").mkdir(exist_ok=True)
    img = pipe.generate(prompt, width=size, height=size, steps=args.sample_steps, seed=args.sample_seed).images[0]
    sample = out / "samples" / f"step-{step:06d}.png"
    img.save(sample)
    say(f"lora: checkpoint at step {step}: {path.name}, sample {sample.relative_to(out)}")


@torch.no_grad()
def flow_loss(pipe: Any, data: Path | str, size: int | None = None, seed: int = 0, n_t: int = 4) -> float:
    """Mean flow-matching loss of the pipeline (with whatever LoRAs are attached) on a data folder, at fixed noise
    and times: the same number before and after training measures what was learnt."""
    examples = load_dataset(data)
    size = size or pipe.preset.default_size
    prep = _prepare(pipe, examples, size)
    hw = size // pipe.preset.ae.downscale
    g = torch.Generator().manual_seed(seed)
    txt_ids = sampling.text_ids(prep.empty.shape[0]).to(pipe.device)
    img_ids = sampling.image_ids(hw, hw).to(pipe.device)
    total = 0.0
    for i in range(len(examples)):
        x0 = prep.x0[i][None].expand(n_t, -1, -1)
        noise = torch.randn(x0.shape, generator=g).to(pipe.device)
        t = ((torch.arange(n_t) + 0.5) / n_t).to(pipe.device)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        ref = prep.refs[i]
        v = pipe.transformer(xt.to(pipe.dtype), img_ids, prep.txt[i][None].expand(n_t, -1, -1).to(pipe.dtype),
                             txt_ids, t, ref=None if ref is None else ref[0][None].expand(n_t, -1, -1).to(pipe.dtype),
                             ref_ids=None if ref is None else ref[1])
        total += F.mse_loss(v.float(), noise - x0).item()
    return total / len(examples)


# ---------------------------------------------------------------- the concept demo


def _cross(draw: ImageDraw.ImageDraw, box: shapes.Box) -> None:
    x0, y0, x1, y1 = box
    w, h = (x1 - x0) / 3, (y1 - y0) / 3
    draw.rectangle((x0 + w, y0, x1 - w, y1), fill=255)
    draw.rectangle((x0, y0 + h, x1, y1 - h), fill=255)


def _diamond(draw: ImageDraw.ImageDraw, box: shapes.Box) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)


def _ring(draw: ImageDraw.ImageDraw, box: shapes.Box) -> None:
    x0, y0, x1, y1 = box
    draw.ellipse(box, fill=255)
    m = (x1 - x0) * 0.25
    draw.ellipse((x0 + m, y0 + m, x1 - m, y1 - m), fill=0)


# Shapes the shapes world does not have. (A new *colour* cannot be taught to nano: its small autoencoder only
# reconstructs the palette, measured: pink comes back white, cyan blue, so no DiT adapter could draw one.)
def _bar(draw: ImageDraw.ImageDraw, box: shapes.Box) -> None:
    x0, y0, x1, y1 = box
    h = (y1 - y0) * 0.3
    cy = (y0 + y1) / 2
    draw.rectangle((x0, cy - h, x1, cy + h), fill=255)


CONCEPT_SHAPES: dict[str, Callable[[ImageDraw.ImageDraw, shapes.Box], None]] = {
    "bar": _bar, "ring": _ring, "cross": _cross, "diamond": _diamond}
_ALL_DRAWERS = {**shapes.DRAWERS, **CONCEPT_SHAPES}


def _check_concept(shape: str) -> None:
    if shape not in CONCEPT_SHAPES:
        raise ValueError(f"unknown concept shape {shape!r}; choose one of: {', '.join(CONCEPT_SHAPES)}")


def render_concept(scene: shapes.Scene, size: int = 128) -> Image.Image:
    """Render a scene that may hold concept shapes (drawn like the world's: same box, anti-aliasing)."""
    return shapes.render(scene, size, drawers=_ALL_DRAWERS)


def _concept_scene(rng: random.Random, shape: str) -> shapes.Scene:
    # Big only: nano's autoencoder (16x downscaling, 8x8 latents at 128 px) blurs a small ring or cross into a dot,
    # so no adapter could draw one (see concept_eval's autoencoder ceiling).
    bg = rng.choice(shapes.COLOURS)
    colour = rng.choice([c for c in shapes.COLOURS if c != bg])
    obj = shapes.Obj(shape, colour, "big", rng.choice(list(shapes.POSITIONS)))
    return shapes.Scene(bg, (obj,))


def make_concept_data(out: Path | str, shape: str = "bar", n: int = 20, seed: int = 0, size: int = 128,
                      prior: int = 0, prior_pipe: Any = None) -> Path:
    """Write `n` captioned single-object scenes of the concept shape (image + .txt), seeded, and `prior` ordinary
    shapes-world prompts with images: prior preservation (as in DreamBooth), so the adapter learns what is new
    without unlearning what the model already draws. The prior images are the rendered scenes, or with
    `prior_pipe` (the model to be adapted) the model's own images for those prompts: then the adapter is pulled
    towards what the model does now, not towards the world's ground truth, which the model only approximates
    (training on the truth moves unrelated prompts too). No prior scene is an evaluation scene."""
    _check_concept(shape)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"kleinbild-concept:{shape}:{seed}")
    for i in range(n):
        scene = _concept_scene(rng, shape)
        render_concept(scene, size).save(out / f"{shape}-{i:03d}.png")
        (out / f"{shape}-{i:03d}.txt").write_text(shapes.caption(scene, rng) + "\n")
    for i in range(prior):
        ex = shapes.sample_t2i(rng)
        if prior_pipe is None:
            img = shapes.render(ex.target, size)
        else:
            img = prior_pipe.generate(ex.prompt, width=size, height=size, seed=seed * 100_003 + i).images[0]
        img.save(out / f"prior-{i:03d}.png")
        (out / f"prior-{i:03d}.txt").write_text(ex.prompt + "\n")
    return out


@functools.lru_cache(maxsize=512)
def _template(shape: str, side: int) -> np.ndarray:
    ss = 4
    mask = Image.new("L", (side * ss, side * ss), 0)
    _ALL_DRAWERS[shape](ImageDraw.Draw(mask), (0, 0, side * ss - 1, side * ss - 1))
    return np.asarray(mask.resize((side, side), Image.Resampling.BOX), dtype=np.float64) / 255.0 >= 0.5


def concept_presence(image: Image.Image, shape: str, min_iou: float = 0.6) -> dict[str, Any]:
    """Find an object of the concept shape: the shapes analyser finds the objects (colour, size, position); each
    object's colour mask, in a square box around it, is compared with every shape's template (the world's and the
    concept's). Present when the concept's template fits best, with IoU >= `min_iou`. Returns whether it is
    present and, if so, the concept object as the analyser read it (`found`) with its IoU."""
    from kleinbild.nano.analyze import _box3, _classify, analyze

    _check_concept(shape)
    rgb = np.asarray(image.convert("RGB"))
    analysis = analyze(rgb)
    classes = _classify(_box3(rgb.astype(np.float32)))
    best: dict[str, Any] = {"present": False, "found": None, "iou": 0.0, "analysis": analysis}
    for f in analysis.objects:
        x0, y0, x1, y1 = f.bbox
        side = max(x1 - x0, y1 - y0)
        if side < 4:
            continue
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left, top = round(cx - side / 2), round(cy - side / 2)
        pad = np.full((side, side), False)
        sub = classes[max(top, 0): top + side, max(left, 0): left + side] == shapes.COLOURS.index(f.colour)
        pad[max(-top, 0): max(-top, 0) + sub.shape[0], max(-left, 0): max(-left, 0) + sub.shape[1]] = sub
        ious = {}
        for name in _ALL_DRAWERS:
            t = _template(name, side)
            ious[name] = float((pad & t).sum() / max((pad | t).sum(), 1))
        winner = max(ious, key=ious.__getitem__)
        if winner == shape and ious[shape] >= min_iou and ious[shape] > best["iou"]:
            # The analyser sizes by covered area, which a ring or cross does not fill: size by the box instead.
            big = side / rgb.shape[1] >= (shapes.SIZE_FRACTIONS["small"] + shapes.SIZE_FRACTIONS["big"]) / 2
            best.update(present=True, found=dataclasses.replace(f, size="big" if big else "small"), iou=ious[shape])
    return best


def concept_eval(
    pipe: Any, shape: str = "bar", n: int = 20, seed: int = 1000, lora_name: str | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """With the pipeline's LoRAs on and off: on fresh concept prompts, how often the concept shape appears (and with
    the prompted colour, size and position); on the eval set's unrelated prompts, the analyser score and the PSNR of
    with-LoRA against without-LoRA images (same seeds). `lora_name` (default: all attached) is switched off for the
    baseline by setting its scale to 0."""
    from kleinbild.nano.analyze import analyze, matches
    from kleinbild.quant import psnr

    _check_concept(shape)
    size = pipe.preset.default_size
    h = lora.host(pipe.transformer)
    names = [lora_name] if lora_name else [a["name"] for a in h.info()]
    if not names:
        raise ValueError("attach the trained LoRA first (pipe.load_lora(...)); concept_eval compares it on and off")
    scales = {nm: h.adapters[nm].scale for nm in names}
    rng = random.Random(f"kleinbild-concept-eval:{shape}:{seed}")
    concept = [(sc, shapes.caption(sc, rng)) for sc in (_concept_scene(rng, shape) for _ in range(n))]
    unrelated = shapes.eval_set("single", n, seed) + shapes.eval_set("double", n, seed)

    def run(on: bool) -> dict[str, Any]:
        for nm in names:
            h.set_scale(nm, scales[nm] if on else 0.0)
        hits = attrs = 0
        for i, (scene, prompt) in enumerate(concept):
            img = pipe.generate(prompt, width=size, height=size, steps=steps, seed=seed + i).images[0]
            res = concept_presence(img, shape)
            hits += res["present"]
            if res["present"]:
                o, f = scene.objects[0], res["found"]
                attrs += (f.colour, f.size, f.position) == (o.colour, o.size, o.position)
        imgs, score, leaks = [], 0, 0
        for i, ex in enumerate(unrelated):
            img = pipe.generate(ex.prompt, width=size, height=size, steps=steps, seed=seed + i).images[0]
            imgs.append(img)
            score += matches(analyze(img), ex.target)["all"]
            leaks += concept_presence(img, shape)["present"]
        return {"concept_present": hits / n, "concept_all_right": attrs / n,
                "unrelated_score": score / len(unrelated), "unrelated_with_concept": leaks / len(unrelated),
                "images": imgs}

    # What the autoencoder alone lets through: the concept targets, encoded and decoded.
    refs = [render_concept(sc, size) for sc, _ in concept]
    ceiling = sum(concept_presence(im, shape)["present"] for im in pipe.decode(torch.cat(pipe.encode_images(refs))))
    try:
        with_lora = run(True)
        without = run(False)
    finally:
        for nm in names:
            h.set_scale(nm, scales[nm])
    psnrs = [psnr(a, b) for a, b in zip(with_lora.pop("images"), without.pop("images"), strict=True)]
    finite = [p for p in psnrs if math.isfinite(p)]
    return {"shape": shape, "n": n, "with_lora": with_lora, "without_lora": without, "autoencoder_ceiling": ceiling / n,
            "unrelated_psnr_mean": float(np.mean(finite)) if finite else float("inf"),
            "unrelated_psnr_min": float(min(psnrs)) if psnrs else float("inf")}


__all__ = [
    "CONCEPT_SHAPES",
    "Example",
    "LoraArgs",
    "TrainableLora",
    "concept_eval",
    "concept_presence",
    "flow_loss",
    "load_dataset",
    "make_concept_data",
    "render_concept",
    "train_lora",
]
