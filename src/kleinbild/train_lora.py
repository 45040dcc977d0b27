"""LoRA training on a folder of captioned images (or edit pairs), for any base model.

`train_lora` keeps the base model frozen and trains rank-r adapters on the transformer's block linears with the
flow-matching loss (the velocity noise - x0 at x_t = (1 - t) x0 + t noise). Each checkpoint writes the optimiser
state (`ckpt.pt`), the adapter in the diffusers/PEFT format (`lora-STEP.safetensors`, loadable by diffusers'
`load_lora_weights`, ComfyUI and kleinbild) and a sample image; a run resumes from its last checkpoint. The data of
step k depends only on the seed and k, so a resumed run continues exactly.

Data folder: images (`.png`, `.jpg`, `.jpeg`, `.webp`) each with a caption in a `.txt` of the same name, or a
`metadata.jsonl` with one object per line: `{"file_name": "out.png", "text": "make it pink", "references":
["in.png"]}` (references make it an edit pair; "caption" or "prompt" may stand for "text").
"""

from __future__ import annotations

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
from PIL import Image
from torch import Tensor, nn

from kleinbild import lora, lora_host, sampling
from kleinbild.images import to_tensor
from kleinbild.loading import LoadOptions, pick_device

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
    """Linear warm-up, then cosine decay to a tenth of the base rate."""
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


def _open_base(base: Any, load_options: LoadOptions | None) -> Any:
    """The pipeline to train on: `base` itself when it is a KleinPipeline, else loaded from it."""
    from kleinbild.pipeline import KleinPipeline

    if isinstance(base, KleinPipeline):
        pipe = base
    else:
        opts = load_options or LoadOptions()
        if opts.dtype is None:
            # float32 on CPU (bf16 autocast does the speed); bf16 weights on a GPU, where memory is what runs out.
            opts = opts.with_changes(dtype="float32" if pick_device(opts.device).type == "cpu" else "bfloat16")
        pipe = KleinPipeline.from_pretrained(base, opts)
    if pipe.quant:
        raise ValueError("train LoRAs on an unquantized base (the adapter is saved for the full-precision model)")
    return pipe


def _shape(args: LoraArgs, alpha: float, adapter: TrainableLora) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the adapter's rank, alpha and layers."""
    return {"rank": args.rank, "alpha": alpha, "targets": args.targets, "layers": adapter.names}


def _resume(out: Path, adapter: TrainableLora, opt: torch.optim.Optimizer, shape: dict[str, Any],
            device: torch.device, say: Log) -> int:
    """Restore adapter and optimiser from `out/ckpt.pt`; returns its step (0 for a new run)."""
    ck = out / "ckpt.pt"
    if not ck.is_file():
        return 0
    state = torch.load(ck, map_location=device, weights_only=True)
    saved = state.get("shape", {})
    if saved != shape:
        raise ValueError(
            f"{out} holds a run with rank {saved.get('rank')}, alpha {saved.get('alpha')}, targets "
            f"{saved.get('targets')!r}; resume with the same settings or choose another --out"
        )
    adapter.load_state_dict(state["lora"])
    opt.load_state_dict(state["opt"])
    step = state["step"]
    say(f"lora: resumed at step {step}")
    return step


def _batch(
    prep: _Prepared, args: LoraArgs, step: int, shift: float, device: torch.device
) -> tuple[Tensor | None, ...]:
    """Targets, prompts, references, noise and times of step k, drawn from (seed, k) alone; one reference count per
    batch, so the sequence lengths agree within it."""
    rng = random.Random(args.seed * 1_000_003 + step)
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    kinds = sorted(prep.groups)
    kind = kinds[rng.randrange(len(kinds))]
    pool = prep.groups[kind]
    idx = [pool[rng.randrange(len(pool))] for _ in range(args.batch)]
    x0 = torch.stack([prep.x0[i] for i in idx])
    txt = torch.stack([prep.empty if rng.random() < args.caption_dropout else prep.txt[i] for i in idx])
    ref_tok = ref_ids = None
    if kind:
        ref_tok = torch.stack([prep.refs[i][0] for i in idx])  # type: ignore[index]
        ref_ids = prep.refs[idx[0]][1]  # type: ignore[index]
    noise = torch.randn(x0.shape, generator=g).to(device)
    u = torch.sigmoid(torch.randn(len(idx), generator=g))
    t = (shift * u / (1 + (shift - 1) * u)).to(device)
    return x0, txt, ref_tok, ref_ids, noise, t


def _step(pipe: Any, adapter: TrainableLora, opt: torch.optim.Optimizer, batch: tuple[Tensor | None, ...],
          ids: tuple[Tensor, Tensor], args: LoraArgs) -> float:
    """One optimiser step on the flow-matching loss; returns the loss."""
    x0, txt, ref_tok, ref_ids, noise, t = batch
    img_ids, txt_ids = ids
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    dt = pipe.dtype
    use_autocast = args.autocast and pipe.device.type in ("cpu", "cuda")
    with torch.autocast(pipe.device.type, dtype=torch.bfloat16, enabled=use_autocast):
        v = pipe.transformer(xt.to(dt), img_ids, txt.to(dt), txt_ids, t,
                             ref=None if ref_tok is None else ref_tok.to(dt), ref_ids=ref_ids)
    loss = F.mse_loss(v.float(), noise - x0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(adapter.parameters(), args.grad_clip)
    opt.step()
    return loss.item()


def train_lora(
    base: Any,
    data: Path | str,
    out: Path | str,
    args: LoraArgs,
    say: Log = print,
    load_options: LoadOptions | None = None,
) -> Path:
    """Train a LoRA on `base` (a KleinPipeline, or anything `KleinPipeline.from_pretrained` takes) and return the
    path of the final adapter (`out/lora.safetensors`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    examples = load_dataset(data)
    pipe = _open_base(base, load_options)
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
    step = _resume(out, adapter, opt, _shape(args, alpha, adapter), pipe.device, say)
    host = lora_host.host(pipe.transformer)
    name = host.add(adapter.entries(), 1.0, name="training", source=str(out))
    ids = sampling.image_ids(hw, hw).to(pipe.device), sampling.text_ids(prep.empty.shape[0]).to(pipe.device)
    sample_prompt = args.sample_prompt or examples[0].caption
    (out / "args.json").write_text(json.dumps({**asdict(args), "alpha": alpha, "data": str(data)}, indent=2))
    try:
        losses: list[float] = []
        t_start = time.perf_counter()
        while step < args.steps:
            batch = _batch(prep, args, step, shift, pipe.device)
            lr = _lr(step, args.steps, args.lr, args.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            losses.append(_step(pipe, adapter, opt, batch, ids, args))
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
    shape = _shape(args, alpha, adapter)
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



__all__ = [
    "Example",
    "LoraArgs",
    "TrainableLora",
    "flow_loss",
    "load_dataset",
    "train_lora",
]
