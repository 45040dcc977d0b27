"""The engine: one pipeline object, loaded once, one `generate()` for text-to-image, editing and multi-reference."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from kleinbild import sampling
from kleinbild.autoencoder import AutoEncoder
from kleinbild.config import ModelPreset
from kleinbild.images import MAX_PIXELS, MIN_SIDE, InputError, open_image, prepare_reference, to_pil, to_tensor
from kleinbild.loading import ModelFiles, ae_state, dit_state, load_into, locate, text_state
from kleinbild.text_encoder import Qwen3TextEncoder, text_encoder_wanted_keys
from kleinbild.tokenizer import PromptTokenizer
from kleinbild.transformer import Flux2Transformer, KVCache

log = logging.getLogger(__name__)

# step (1-based, steps done), total steps, current latent (B, C, h, w) in float32
ProgressCallback = Callable[[int, int, Tensor], None]
ImageInput = Image.Image | str | Path

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but PyTorch sees no CUDA GPU here; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' was asked for but it is not available here; use --device cpu")
    return dev


def pick_dtype(dtype: str | torch.dtype | None = None) -> torch.dtype:
    """bfloat16 unless asked otherwise: fast on GPUs and on CPUs with AVX-512 bf16, and what the weights ship in."""
    if dtype is None:
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32") from None


@dataclass
class GenerationResult:
    images: list[Image.Image]
    settings: dict[str, Any] = field(default_factory=dict)


class KleinPipeline:
    """A loaded FLUX.2 [klein] model: transformer, autoencoder, text encoder and tokenizer."""

    def __init__(
        self,
        preset: ModelPreset,
        transformer: Flux2Transformer,
        autoencoder: AutoEncoder,
        text_encoder: Qwen3TextEncoder,
        tokenizer: PromptTokenizer,
        device: torch.device,
        dtype: torch.dtype,
        source: str = "",
    ):
        self.preset = preset
        self.transformer = transformer
        self.autoencoder = autoencoder
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.source = source

    # ------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        *,
        vae: str | Path | None = None,
        text_encoder: str | Path | None = None,
        preset: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        text_layers: tuple[int, ...] | None = None,
        max_text_length: int | None = None,
    ) -> KleinPipeline:
        """Load from a diffusers folder, an official single file (+ `vae` and `text_encoder`), a preset or a repo id.

        `preset` picks the sampling behaviour for a single file whose name is not an official one.
        `text_layers`/`max_text_length` override the tapped Qwen3 layers and the prompt length (for research
        and for tiny test models).
        """
        files = locate(model, vae, text_encoder, preset, text_layers, max_text_length)
        return cls.from_files(files, device=device, dtype=dtype, source=str(model))

    @classmethod
    def from_files(
        cls,
        files: ModelFiles,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        source: str = "",
    ) -> KleinPipeline:
        dev, dt = pick_device(device), pick_dtype(dtype)
        p = files.preset
        t0 = time.perf_counter()
        with torch.device("meta"):
            dit = Flux2Transformer(p.dit)
            ae = AutoEncoder(p.ae)
            te = Qwen3TextEncoder(p.text)
        load_into(dit, dit_state(files), f"transformer {files.dit_files[0]}", dev, dt)
        load_into(ae, ae_state(files), f"autoencoder {files.ae_files[0]}", dev, dt)
        te_state = text_state(files, text_encoder_wanted_keys(p.text))
        load_into(te, te_state, f"text encoder {files.text_files[0]}", dev, dt)
        tok = PromptTokenizer.from_dir(files.tokenizer_dir)
        log.info("loaded %s (%s) on %s/%s in %.1fs", source, p.name, dev, dt, time.perf_counter() - t0)
        return cls(p, dit, ae, te, tok, dev, dt, source=source)

    # ------------------------------------------------------------ stages

    @torch.inference_mode()
    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        """(len(prompts), max_length, 3 * hidden) prompt embeddings, in the pipeline dtype."""
        ids, mask = self.tokenizer.encode(list(prompts), self.preset.text.max_length)
        return self.text_encoder(ids.to(self.device), mask.to(self.device)).to(self.dtype)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> list[Tensor]:
        """Each prepared reference image -> (1, C, h, w) normalised latent."""
        return [self.autoencoder.encode(to_tensor(im).to(self.device, self.dtype)) for im in images]

    @torch.inference_mode()
    def decode(self, latent: Tensor) -> list[Image.Image]:
        return to_pil(self.autoencoder.decode(latent.to(self.device, self.dtype)))

    def prepare_references(self, images: Sequence[ImageInput]) -> list[Image.Image]:
        pil = [open_image(im) if isinstance(im, (str, Path)) else im for im in images]
        cap = self.preset.max_ref_pixels_single if len(pil) == 1 else self.preset.max_ref_pixels_multi
        return [prepare_reference(im, cap, self.preset.ae.downscale, i) for i, im in enumerate(pil)]

    # ------------------------------------------------------------ generate

    def _size(
        self, width: int | None, height: int | None, refs: list[Image.Image], notes: list[str]
    ) -> tuple[int, int]:
        m = self.preset.ae.downscale
        if width is None or height is None:
            default = refs[0].size if refs else (self.preset.default_size, self.preset.default_size)
            width = default[0] if width is None else width
            height = default[1] if height is None else height
        for name, v in (("width", width), ("height", height)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise InputError(f"{name} must be an integer number of pixels, got {v!r}")
        w, h = (width // m) * m, (height // m) * m
        if (w, h) != (width, height):
            notes.append(f"size {width}x{height} rounded down to {w}x{h} (a multiple of {m})")
        if w < MIN_SIDE or h < MIN_SIDE:
            raise InputError(f"size {width}x{height} is too small; both sides must be at least {MIN_SIDE} px")
        if w * h > MAX_PIXELS:
            raise InputError(
                f"size {w}x{h} is {w * h / 1e6:.1f} megapixels; at most {MAX_PIXELS / 2**20:.0f} MP "
                "(e.g. 2048x2048) is supported"
            )
        return w, h

    def generate(
        self,
        prompt: str,
        images: Sequence[ImageInput] | ImageInput | None = None,
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        negative_prompt: str | None = None,
        seed: int | None = None,
        num_images: int = 1,
        noise: Tensor | None = None,
        callback: ProgressCallback | None = None,
    ) -> GenerationResult:
        """Text-to-image (no image), edit (one) or multi-reference generation (several).

        Returns the images and the settings used (seed, size, steps, guidance, ...), so any result can be
        reproduced. `noise` (n, C, H/16, W/16) replaces the seeded initial noise.
        """
        p = self.preset
        notes: list[str] = []
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        if not isinstance(num_images, int) or num_images < 1:
            raise InputError(f"num_images must be a positive integer, got {num_images!r}")
        steps = p.default_steps if steps is None else steps
        if not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps must be a positive integer, got {steps!r}")
        if p.uses_cfg:
            guidance = p.default_guidance if guidance is None else float(guidance)
            negative_prompt = "" if negative_prompt is None else negative_prompt
            if not isinstance(negative_prompt, str):
                raise InputError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        else:
            if guidance is not None:
                msg = f"guidance {guidance} ignored: {p.name} is guidance-distilled"
                log.warning(msg)
                notes.append(msg)
            if negative_prompt:
                msg = f"negative prompt ignored: {p.name} runs without CFG"
                log.warning(msg)
                notes.append(msg)
            guidance, negative_prompt = None, None

        if images is None:
            images = []
        elif isinstance(images, (Image.Image, str, Path)):
            images = [images]
        refs = self.prepare_references(list(images))
        w, h = self._size(width, height, refs, notes)
        m = p.ae.downscale
        th, tw = h // m, w // m
        if noise is None:
            if seed is None:
                seed = secrets.randbelow(2**32)
            if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                raise InputError(f"seed must be a non-negative integer, got {seed!r}")
            noise = sampling.make_noise(num_images, p.ae.latent_channels, th, tw, seed)
        else:
            expect = (num_images, p.ae.latent_channels, th, tw)
            if tuple(noise.shape) != expect:
                raise InputError(f"noise has shape {tuple(noise.shape)}; for this request it must be {expect}")
            seed = None

        t_start = time.perf_counter()
        latent = self._sample(prompt, negative_prompt, refs, noise, steps, guidance, th, tw, callback)
        out = self.decode(latent)
        settings = {
            "model": p.name,
            "source": self.source,
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "seed": seed,
            "steps": steps,
            "guidance": guidance,
            "width": w,
            "height": h,
            "num_images": num_images,
            "references": [list(r.size) for r in refs],
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "seconds": round(time.perf_counter() - t_start, 3),
            "notes": notes,
        }
        return GenerationResult(out, settings)

    @torch.inference_mode()
    def _sample(
        self,
        prompt: str,
        negative_prompt: str | None,
        refs: list[Image.Image],
        noise: Tensor,
        steps: int,
        guidance: float | None,
        th: int,
        tw: int,
        callback: ProgressCallback | None,
    ) -> Tensor:
        p, dev, dt = self.preset, self.device, self.dtype
        n = noise.shape[0]
        cfg = guidance is not None
        prompts = [negative_prompt or "", prompt] if cfg else [prompt]
        emb = self.encode_prompt(prompts)
        # [uncond x n, cond x n] for CFG; cond x n otherwise.
        txt = emb.repeat_interleave(n, dim=0)
        txt_ids = sampling.text_ids(txt.shape[1]).to(dev)
        img_ids = sampling.image_ids(th, tw).to(dev)
        ref_tok = ref_ids = None
        if refs:
            lat = self.encode_images(refs)
            ref_tok = torch.cat([sampling.pack(z) for z in lat], dim=1).expand(txt.shape[0], -1, -1)
            ref_ids = sampling.reference_ids([tuple(z.shape[-2:]) for z in lat], p.ref_time_offset).to(dev)
        timesteps = sampling.schedule(steps, th * tw)
        kv: list[KVCache] = []
        model = self.transformer

        def velocity(x: Tensor, t: Tensor, i: int) -> Tensor:
            xin = sampling.pack(x).to(dt)
            if cfg:
                xin, t = torch.cat([xin, xin]), torch.cat([t, t])
            if p.kv_cache_refs and ref_tok is not None:
                if i == 0:
                    v, cache = model(xin, img_ids, txt, txt_ids, t, ref=ref_tok, ref_ids=ref_ids, extract_kv=True)
                    kv.append(cache)
                else:
                    v = model(xin, img_ids, txt, txt_ids, t, kv_cache=kv[0])
            else:
                v = model(xin, img_ids, txt, txt_ids, t, ref=ref_tok, ref_ids=ref_ids)
            if cfg:
                v = sampling.cfg_combine(v.float(), guidance)
            return sampling.unpack(v, th, tw)

        def on_step(i: int, total: int, x: Tensor) -> None:
            if callback is not None:
                callback(i + 1, total, x)

        return sampling.euler(noise.to(dev), timesteps, velocity, on_step)
