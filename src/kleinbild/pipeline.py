"""The engine: one pipeline object, loaded once, one `generate()` for text-to-image, editing and multi-reference."""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from kleinbild import lora, offload, sampling
from kleinbild.autoencoder import AutoEncoder
from kleinbild.config import ModelPreset
from kleinbild.images import MAX_PIXELS, MIN_SIDE, InputError, open_image, prepare_reference, to_pil, to_tensor
from kleinbild.loading import ModelFiles, ae_state, dit_state, load_into, locate, text_state
from kleinbild.quant import prepare_quantized
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


class GenerationCancelled(Exception):
    """Raise it from a progress callback to stop a generation after the current step; it leaves generate()."""


def content_key(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        # Length-prefixed, so ("ab", "c") and ("a", "bc") cannot collide.
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


class ContentCache:
    """A bounded LRU of tensors keyed by a digest of their inputs, counting hits, misses and the time hits saved.

    Each entry remembers what computing it cost, so `saved_seconds` is the encoder time that hits skipped.
    `max_entries=0` disables it. Safe to read from other threads while one thread uses it.
    """

    def __init__(self, max_entries: int):
        self.max_entries = max(0, int(max_entries))
        self.hits = 0
        self.misses = 0
        self.saved_seconds = 0.0
        self._items: OrderedDict[str, tuple[Tensor, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[Tensor, float] | None:
        """The cached value and the seconds this hit saved, or None (a miss)."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            self.saved_seconds += item[1]
            return item

    def put(self, key: str, value: Tensor, cost_seconds: float) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            self._items[key] = (value, cost_seconds)
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def resize(self, max_entries: int) -> None:
        with self._lock:
            self.max_entries = max(0, int(max_entries))
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "entries": len(self._items),
                "max_entries": self.max_entries,
                "hits": self.hits,
                "misses": self.misses,
                "saved_seconds": round(self.saved_seconds, 4),
            }


@dataclass
class _Plan:
    """One validated request, ready to sample: what generate() decided before any model runs."""

    prompt: str
    negative_prompt: str | None
    refs: list[Image.Image]
    width: int
    height: int
    steps: int
    guidance: float | None
    seed: int | None
    noise: Tensor
    notes: list[str]
    callback: ProgressCallback | None = None

    @property
    def n(self) -> int:
        return self.noise.shape[0]

    def group_key(self) -> tuple:
        """Plans with equal keys can share every forward pass."""
        return (self.width, self.height, self.steps, self.guidance, tuple(r.size for r in self.refs))


class KleinPipeline:
    """A loaded FLUX.2 [klein] model: transformer, autoencoder, text encoder and tokenizer."""

    def __init__(
        self,
        preset: ModelPreset,
        transformer: Flux2Transformer,
        autoencoder: AutoEncoder,
        text_encoder: Qwen3TextEncoder | None,
        tokenizer: PromptTokenizer,
        device: torch.device,
        dtype: torch.dtype,
        source: str = "",
        files: ModelFiles | None = None,
        offload_mode: str = "none",
    ):
        self.preset = preset
        self.transformer = transformer
        self.autoencoder = autoencoder
        self._text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.source = source
        self.files = files
        if device.type == "cpu":
            autoencoder.use_channels_last()
            autoencoder.use_subpixel_upsample()
        self.offload = offload.check_mode(offload_mode)
        self.text_encoder_loads = 0  # how often the text encoder was (re)materialised; offload tests read it
        self._parked: dict[str, offload.Parked] = {}
        # Without files the text encoder cannot be read again, so offload keeps it (on the host, with the rest,
        # on an accelerator) instead of dropping it after each prompt.
        self._can_reload = files is not None
        self._compiled: dict[str, Any] = {}  # torch.compile'd callables (see compile())
        if self.offload != "none" and device.type != "cpu":
            self._park()
            if text_encoder is not None:
                self._place_text_encoder(text_encoder)
        self.quant: str | None = None  # quantization format of the transformer's linear layers, if any
        # Keyed by content, so an edit loop on the same image or prompt skips the encoders. Prompt embeddings
        # are (1, 512, 7680) for klein-4b, ~8 MB in bf16 each; reference latents are much smaller.
        self.prompt_cache = ContentCache(32)
        self.reference_cache = ContentCache(32)

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
        quant: str | None = None,
        loras: Sequence[str | tuple[str | Path, float]] | None = None,
        fuse_loras: bool = False,
        offload_mode: str = "none",
        compile: bool = False,
    ) -> KleinPipeline:
        """Load from a diffusers folder, an official single file (+ `vae` and `text_encoder`), a preset or a repo id.

        `preset` picks the sampling behaviour for a single file whose name is not an official one.
        `text_layers`/`max_text_length` override the tapped Qwen3 layers and the prompt length (for research
        and for tiny test models). `quant` ("fp8", "nvfp4", "int8") quantizes the transformer's block linears while
        loading (quantized files load as they are without it). `loras`: files or `FILE:SCALE` strings or
        (file, scale) pairs, attached in order; `fuse_loras` merges them into the weights. `offload_mode`: "none",
        "model" or "sequential" (see kleinbild.offload): lower peak memory for a little re-reading. `compile`: see
        `compile()`.
        """
        files = locate(model, vae, text_encoder, preset, text_layers, max_text_length)
        pipe = cls.from_files(files, device=device, dtype=dtype, source=str(model), quant=quant,
                              offload_mode=offload_mode)
        for spec in loras or ():
            path, scale = lora.parse_spec(spec) if isinstance(spec, (str, Path)) else spec
            pipe.load_lora(path, scale)
        if fuse_loras and loras:
            pipe.fuse_loras()
        if compile:
            pipe.compile()
        return pipe

    @classmethod
    def from_files(
        cls,
        files: ModelFiles,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        source: str = "",
        quant: str | None = None,
        offload_mode: str = "none",
    ) -> KleinPipeline:
        dev, dt = pick_device(device), pick_dtype(dtype)
        p = files.preset
        t0 = time.perf_counter()
        with torch.device("meta"):
            dit = Flux2Transformer(p.dit)
            ae = AutoEncoder(p.ae)
            te = Qwen3TextEncoder(p.text)
        mode = offload.check_mode(offload_mode)
        # With offload, weights are assigned on the host (memory-mapped where the file allows) and visit the
        # device per stage.
        home = torch.device("cpu") if mode != "none" else dev
        dit_sd = dit_state(files)
        quant_used = prepare_quantized(dit, dit_sd, quant, home)
        load_into(dit, dit_sd, f"transformer {files.dit_files[0]}", home, dt)
        del dit_sd
        load_into(ae, ae_state(files), f"autoencoder {files.ae_files[0]}", home, dt)
        # Checked now, so a bad text encoder fails at load time; with offload it is dropped again (its pages
        # were never touched) and read on first use.
        te = _load_text_encoder(te, files, home, dt)
        tok = PromptTokenizer.from_dir(files.tokenizer_dir)
        log.info("loaded %s (%s) on %s/%s in %.1fs", source, p.name, dev, dt, time.perf_counter() - t0)
        pipe = cls(p, dit, ae, None if mode != "none" else te, tok, dev, dt, source=source, files=files,
                   offload_mode=mode)
        pipe.quant = quant_used
        return pipe

    # ------------------------------------------------------------ memory modes

    @property
    def text_encoder(self) -> Qwen3TextEncoder:
        if self._text_encoder is None:
            assert self.files is not None
            with torch.device("meta"):
                te = Qwen3TextEncoder(self.preset.text)
            home = torch.device("cpu") if self.offload != "none" else self.device
            self._text_encoder = _load_text_encoder(te, self.files, home, self.dtype)
            self.text_encoder_loads += 1
            if self._parked:  # parking is on: an accelerator
                self._place_text_encoder(te)
        return self._text_encoder

    @text_encoder.setter
    def text_encoder(self, module: Qwen3TextEncoder | None) -> None:
        self._text_encoder = module

    def _place_text_encoder(self, te: Qwen3TextEncoder) -> None:
        """Host-resident text encoder on an accelerator: all of it visits per prompt (`model`, see encode_prompt)
        or one layer at a time (`sequential`)."""
        if self.offload == "sequential":
            offload.move_resident(te, te.model.layers, self.device)
            offload.sequential_blocks(te.model.layers, self.device)

    def _park(self) -> None:
        dev = self.device
        self._parked["autoencoder"] = offload.Parked(self.autoencoder, dev)
        if self.offload == "model":
            self._parked["transformer"] = offload.Parked(self.transformer, dev)
            return
        blocks = [*self.transformer.double_blocks, *self.transformer.single_blocks]
        offload.move_resident(self.transformer, blocks, dev)  # embedders, modulation, final layer: small
        offload.sequential_blocks(blocks, dev)

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        parked = self._parked.get(name)
        if parked is None:
            yield
            return
        with parked.visit():
            yield

    def compile(self, mode: str | None = None, decoder: bool = True) -> None:
        """Run the transformer (and the autoencoder's decoder) through `torch.compile` from now on.

        The modules are not replaced: compiled wrappers share their weights, so the plain path stays available
        (see `uncompile`). The first call at each new size pays the compilation (tens of seconds); worth it on a
        GPU for repeated generations. `mode` is torch.compile's ("max-autotune", "reduce-overhead", ...).
        """
        if self.offload != "none":
            raise ValueError(f"compile() needs offload mode 'none' (weights moving per stage defeat it), not "
                             f"{self.offload!r}: pass --offload none (Python: offload_mode='none')")
        self._compiled["transformer"] = torch.compile(self.transformer, mode=mode)
        if decoder:
            self._compiled["decode"] = torch.compile(self.autoencoder.decode, mode=mode)

    def uncompile(self) -> None:
        self._compiled.clear()

    @property
    def compiled(self) -> bool:
        return bool(self._compiled)

    # ------------------------------------------------------------ LoRA

    def load_lora(self, source: str | Path | Mapping[str, Tensor], scale: float = 1.0, *, name: str | None = None,
                  fuse: bool = False) -> str:
        """Attach a LoRA (diffusers/PEFT, kohya/ComfyUI or official-key file, or a state dict); returns its name.

        Several can be attached, each with its own scale. Every key must apply to this transformer, else ValueError
        lists the ones that do not. `fuse` merges it into the weights (faster; `unfuse_loras` takes it out again).
        """
        weights = lora.parse_lora(source, self.transformer)
        host = lora.host(self.transformer)
        added = host.add(weights, scale, name=name, device=self.device, dtype=self.dtype)
        if fuse:
            host.fuse([added])
        return added

    def set_lora_scale(self, name: str, scale: float) -> None:
        lora.host(self.transformer).set_scale(name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Detach one LoRA by name, or all of them."""
        lora.host(self.transformer).remove(name)

    def fuse_loras(self, names: Sequence[str] | None = None) -> None:
        lora.host(self.transformer).fuse(names)

    def unfuse_loras(self, names: Sequence[str] | None = None) -> None:
        lora.host(self.transformer).unfuse(names)

    @property
    def loras(self) -> list[dict[str, Any]]:
        """The attached LoRAs: name, source, scale, fused, layers, ranks."""
        attached = getattr(self.transformer, "_kleinbild_lora", None)
        return attached.info() if attached is not None else []

    # ------------------------------------------------------------ stages

    @torch.inference_mode()
    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        """(len(prompts), max_length, 3 * hidden) prompt embeddings, in the pipeline dtype."""
        ids, mask = self.tokenizer.encode(list(prompts), self.preset.text.max_length)
        te = self.text_encoder
        if self.offload == "model" and self._parked:
            with offload.Parked(te, self.device).visit():
                out = te(ids.to(self.device), mask.to(self.device)).to(self.dtype)
        else:
            out = te(ids.to(self.device), mask.to(self.device)).to(self.dtype)
        if self.offload != "none" and self._can_reload:
            self._text_encoder = None  # its touched pages go back to the page cache, out of this process
        return out

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> list[Tensor]:
        """Each prepared reference image -> (1, C, h, w) normalised latent."""
        with self._stage("autoencoder"):
            return [self.autoencoder.encode(to_tensor(im).to(self.device, self.dtype)) for im in images]

    @torch.inference_mode()
    def decode(self, latent: Tensor) -> list[Image.Image]:
        with self._stage("autoencoder"):
            decode = self._compiled.get("decode", self.autoencoder.decode)
            return to_pil(decode(latent.to(self.device, self.dtype)))

    def prepare_references(self, images: Sequence[ImageInput]) -> list[Image.Image]:
        pil = [open_image(im) if isinstance(im, (str, Path)) else im for im in images]
        cap = self.preset.max_ref_pixels_single if len(pil) == 1 else self.preset.max_ref_pixels_multi
        return [prepare_reference(im, cap, self.preset.ae.downscale, i) for i, im in enumerate(pil)]

    # ------------------------------------------------------------ caches

    def configure_caches(self, prompts: int | None = None, references: int | None = None) -> None:
        """Set how many prompt embeddings / reference latents are kept; 0 disables that cache."""
        if prompts is not None:
            self.prompt_cache.resize(prompts)
        if references is not None:
            self.reference_cache.resize(references)

    def clear_caches(self) -> None:
        self.prompt_cache.clear()
        self.reference_cache.clear()

    def cache_stats(self) -> dict[str, dict[str, Any]]:
        return {"prompt": self.prompt_cache.stats(), "reference": self.reference_cache.stats()}

    def _cached_prompts(self, prompts: Sequence[str], stats: list[dict[str, Any]]) -> list[Tensor]:
        """(1, L, D) embedding per prompt; misses go through the text encoder together, once per distinct prompt.

        `stats[i]` gets prompt i's hit or miss and the seconds a hit saved.
        """
        keys = [content_key(b"prompt", p.encode("utf-8", "surrogatepass")) for p in prompts]
        rows: dict[str, Tensor] = {}
        todo: dict[str, str] = {}
        for k, p, st in zip(keys, prompts, stats, strict=True):
            if k in rows or k in todo:
                st["prompt_hits"] = st.get("prompt_hits", 0) + (k in rows)
                st["prompt_misses"] = st.get("prompt_misses", 0) + (k in todo)
                continue
            got = self.prompt_cache.get(k)
            if got is None:
                todo[k] = p
                st["prompt_misses"] = st.get("prompt_misses", 0) + 1
            else:
                rows[k] = got[0]
                st["prompt_hits"] = st.get("prompt_hits", 0) + 1
                st["saved_seconds"] = st.get("saved_seconds", 0.0) + got[1]
        if todo:
            t0 = time.perf_counter()
            emb = self.encode_prompt(list(todo.values()))
            cost = (time.perf_counter() - t0) / len(todo)
            for i, k in enumerate(todo):
                # A clone, so a cached row does not keep the whole batch's storage alive.
                rows[k] = emb[i : i + 1].clone() if len(todo) > 1 else emb
                self.prompt_cache.put(k, rows[k], cost)
        return [rows[k] for k in keys]

    def _cached_references(self, refs: Sequence[Image.Image], stats: dict[str, Any]) -> list[Tensor]:
        """(1, C, h, w) latent per prepared reference, from the cache when the same pixels were encoded before."""
        out = []
        for im in refs:
            k = content_key(b"reference", im.mode.encode(), f"{im.size}".encode(), im.tobytes())
            got = self.reference_cache.get(k)
            if got is None:
                t0 = time.perf_counter()
                lat = self.encode_images([im])[0]
                self.reference_cache.put(k, lat, time.perf_counter() - t0)
                stats["reference_misses"] = stats.get("reference_misses", 0) + 1
            else:
                lat = got[0]
                stats["reference_hits"] = stats.get("reference_hits", 0) + 1
                stats["saved_seconds"] = stats.get("saved_seconds", 0.0) + got[1]
            out.append(lat)
        return out

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
        reproduced. `noise` (n, C, H/16, W/16) replaces the seeded initial noise. A callback that raises
        `GenerationCancelled` stops the run after that step; the exception propagates.
        """
        plan = self._plan(
            prompt,
            images,
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            negative_prompt=negative_prompt,
            seed=seed,
            num_images=num_images,
            noise=noise,
        )
        return self._run_group([plan], callback)[0]

    def generate_batch(
        self, requests: Sequence[Mapping[str, Any]], callback: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        """Several generate() requests in as few batched forward passes as their shapes allow.

        Each request is a mapping of generate()'s arguments (`prompt` and `images` included); its own
        `callback` gets that request's rows of the latent. Requests that agree on size, steps, guidance and
        reference sizes run as one batch (prompts, negative prompts, references and seeds may differ); the
        others run as further batches, in order of first appearance. `callback` sees each batch's whole latent
        and may raise `GenerationCancelled` to stop. Every request is validated before anything runs, so one
        bad request raises `InputError` and nothing is computed. Results come back in request order; each one's
        settings say how many images shared its forward (`batch_size`).
        """
        plans: list[_Plan] = []
        for i, req in enumerate(requests):
            if not isinstance(req, Mapping):
                raise InputError(f"request {i} is a {type(req).__name__}; pass a dict of generate() arguments")
            args = dict(req)
            if "prompt" not in args:
                raise InputError(f"request {i} has no prompt")
            cb = args.pop("callback", None)
            try:
                plan = self._plan(args.pop("prompt"), args.pop("images", None), **args)
            except TypeError as e:
                raise InputError(f"request {i}: {e}") from None
            plan.callback = cb
            plans.append(plan)
        groups: dict[tuple, list[int]] = {}
        for i, plan in enumerate(plans):
            groups.setdefault(plan.group_key(), []).append(i)
        results: list[GenerationResult | None] = [None] * len(plans)
        for idx in groups.values():
            for i, res in zip(idx, self._run_group([plans[i] for i in idx], callback), strict=True):
                results[i] = res
        return results  # type: ignore[return-value]

    def _plan(
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
    ) -> _Plan:
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
        return _Plan(prompt, negative_prompt, refs, w, h, steps, guidance, seed, noise, notes)

    def _run_group(self, plans: list[_Plan], callback: ProgressCallback | None) -> list[GenerationResult]:
        """Sample and decode plans that share a group key, all in one batch."""
        p = self.preset
        t_start = time.perf_counter()
        stats: list[dict[str, Any]] = [{} for _ in plans]
        timings: dict[str, float] = {}
        latent = self._sample_group(plans, stats, timings, callback)
        t0 = time.perf_counter()
        out = self.decode(latent)
        timings["decode"] = time.perf_counter() - t0
        seconds = round(time.perf_counter() - t_start, 3)
        rows = sum(pl.n for pl in plans)
        results, at = [], 0
        for pl, st in zip(plans, stats, strict=True):
            st["saved_seconds"] = round(st.get("saved_seconds", 0.0), 4)
            settings = {
                "model": p.name,
                "source": self.source,
                "prompt": pl.prompt,
                "negative_prompt": pl.negative_prompt,
                "seed": pl.seed,
                "steps": pl.steps,
                "guidance": pl.guidance,
                "width": pl.width,
                "height": pl.height,
                "num_images": pl.n,
                "references": [list(r.size) for r in pl.refs],
                "dtype": str(self.dtype).removeprefix("torch."),
                "quant": self.quant,
                "compiled": self.compiled,
                "loras": [{"name": x["name"], "scale": x["scale"]} for x in self.loras],
                "device": str(self.device),
                "seconds": seconds,
                "timings": {k: round(v, 4) for k, v in timings.items()},
                "batch_size": rows,
                "cache": st,
                "notes": pl.notes,
            }
            results.append(GenerationResult(out[at : at + pl.n], settings))
            at += pl.n
        return results

    @torch.inference_mode()
    def _sample_group(
        self,
        plans: list[_Plan],
        stats: list[dict[str, Any]],
        timings: dict[str, float],
        callback: ProgressCallback | None,
    ) -> Tensor:
        p, dev, dt = self.preset, self.device, self.dtype
        first = plans[0]
        th, tw = first.height // p.ae.downscale, first.width // p.ae.downscale
        guidance, steps = first.guidance, first.steps
        cfg = guidance is not None
        counts = [pl.n for pl in plans]

        t0 = time.perf_counter()
        if cfg:
            prompts = [x for pl in plans for x in (pl.negative_prompt or "", pl.prompt)]
            per = [st for st in stats for _ in range(2)]
        else:
            prompts, per = [pl.prompt for pl in plans], stats
        emb = self._cached_prompts(prompts, per)
        if cfg:
            uncond = torch.cat([e.expand(n, -1, -1) for e, n in zip(emb[0::2], counts, strict=True)])
            cond = torch.cat([e.expand(n, -1, -1) for e, n in zip(emb[1::2], counts, strict=True)])
            # [uncond x N, cond x N], the layout cfg_combine splits.
            txt = torch.cat([uncond, cond])
        else:
            txt = torch.cat([e.expand(n, -1, -1) for e, n in zip(emb, counts, strict=True)])
        timings["text"] = time.perf_counter() - t0

        txt_ids = sampling.text_ids(txt.shape[1]).to(dev)
        img_ids = sampling.image_ids(th, tw).to(dev)
        ref_tok = ref_ids = None
        t0 = time.perf_counter()
        if first.refs:
            per_plan = []
            for pl, st in zip(plans, stats, strict=True):
                lat = self._cached_references(pl.refs, st)
                per_plan.append(torch.cat([sampling.pack(z) for z in lat], dim=1))
            if len(plans) == 1:
                ref_tok = per_plan[0].expand(txt.shape[0], -1, -1)
            else:
                ref_tok = torch.cat([r.expand(n, -1, -1) for r, n in zip(per_plan, counts, strict=True)])
                if cfg:
                    ref_tok = torch.cat([ref_tok, ref_tok])
            ref_ids = sampling.reference_ids([tuple(z.shape[-2:]) for z in lat], p.ref_time_offset).to(dev)
        timings["references"] = time.perf_counter() - t0

        timesteps = sampling.schedule(steps, th * tw, p.schedule_shift)
        kv: list[KVCache] = []
        model = self._compiled.get("transformer", self.transformer)

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
            at = 0
            for pl in plans:
                if pl.callback is not None:
                    pl.callback(i + 1, total, x[at : at + pl.n])
                at += pl.n
            if callback is not None:
                callback(i + 1, total, x)

        t0 = time.perf_counter()
        noise = torch.cat([pl.noise for pl in plans]) if len(plans) > 1 else first.noise
        try:
            with self._stage("transformer"):
                return sampling.euler(noise.to(dev), timesteps, velocity, on_step)
        finally:
            timings["denoise"] = time.perf_counter() - t0


def _load_text_encoder(
    te: Qwen3TextEncoder, files: ModelFiles, device: torch.device, dtype: torch.dtype
) -> Qwen3TextEncoder:
    state = text_state(files, text_encoder_wanted_keys(te.cfg))
    load_into(te, state, f"text encoder {files.text_files[0]}", device, dtype)
    return te
