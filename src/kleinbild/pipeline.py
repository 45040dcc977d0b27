"""The engine: one pipeline object, loaded once, one `generate()` for text-to-image, editing and multi-reference."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from kleinbild import components, lora, lora_host, masking, offload, sampling
from kleinbild.autoencoder import AutoEncoder
from kleinbild.cache import ContentCache, cached_latents, cached_prompts
from kleinbild.compiling import CompileCounter, compile_counted, compile_shapes
from kleinbild.config import ModelPreset
from kleinbild.files import release_file_pages
from kleinbild.images import InputError, to_pil, to_tensor
from kleinbild.loading import LoadOptions, ModelFiles, load_tokenizer, locate_with, pick_device, pick_dtype
from kleinbild.masking import MaskInput
from kleinbild.request import ImageInput, Request, validate
from kleinbild.result import GenerationCancelled, GenerationResult, NonFiniteError, check_finite
from kleinbild.step_cache import StepCache
from kleinbild.text_encoder import Qwen3TextEncoder
from kleinbild.tokenizer import PromptTokenizer
from kleinbild.transformer import Flux2Transformer, KVCache

log = logging.getLogger(__name__)

# step (1-based, steps done), total steps, current latent (B, C, h, w) in float32
ProgressCallback = Callable[[int, int, Tensor], None]


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
        self._counters: dict[str, CompileCounter] = {}
        if self.offload != "none" and device.type != "cpu":
            self._park()
            if text_encoder is not None:
                self._place_text_encoder(text_encoder)
        self.quant: str | None = None  # quantization format of the transformer's linear layers, if any
        self.text_quant: str | None = None  # and of the text encoder's
        self._text_quant_request: str | None = None  # what a reload (offload) quantizes to
        # Keyed by content, so an edit loop on the same image or prompt skips the encoders. Prompt embeddings
        # are (1, 512, 7680) for klein-4b, ~8 MB in bf16 each; reference latents are much smaller.
        self.prompt_cache = ContentCache(32)
        self.reference_cache = ContentCache(32)

    # ------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, model: str | Path = "nano", options: LoadOptions | None = None, **changes: Any
                        ) -> KleinPipeline:
        """Load from a diffusers folder, an official single file (+ `vae` and `text_encoder`), a preset or a repo id.

        `options` (a `LoadOptions`) or keyword arguments of the same names, which win over `options`:
        `vae`, `text_encoder`: the parts of a single-file model. `preset` picks the sampling behaviour for a single
        file whose name is not an official one. `device`, `dtype` (default: the best device, bfloat16).
        `quant` ("fp8", "nvfp4", "int8") quantizes the transformer's block linears while loading (quantized files
        load as they are without it). `loras`: files or `FILE:SCALE` strings or (file, scale) pairs, attached in
        order; `fuse_loras` merges them into the weights. `offload_mode`: "none", "model" or "sequential" (see
        kleinbild.offload): lower peak memory for a little re-reading. `compile`: see `compile()`.
        `text_layers`/`max_text_length` override the tapped Qwen3 layers and the prompt length (for research and
        for tiny test models).
        """
        o = (options or LoadOptions()).with_changes(**changes)
        return cls.from_located(locate_with(model, o), o, source=str(model))

    @classmethod
    def from_located(cls, files: ModelFiles, options: LoadOptions, source: str = "") -> KleinPipeline:
        """Load what `locate_with` found (so a caller can check a request against `files.preset` first)."""
        o = options
        pipe = cls.from_files(files, device=o.device, dtype=o.dtype, source=source, quant=o.quant,
                              offload_mode=o.offload_mode, text_quant=o.text_quant)
        for spec in o.loras:
            path, scale = lora.parse_spec(spec) if isinstance(spec, (str, Path)) else spec
            pipe.load_lora(path, scale)
        if o.fuse_loras and o.loras:
            pipe.fuse_loras()
        if o.compile:
            pipe.compile(dynamic=compile_shapes(o.compile_shapes))
        if o.warm_sizes:
            pipe.warm(o.warm_sizes, batches=(1, 2))
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
        text_quant: str | None = None,
    ) -> KleinPipeline:
        dev, dt = pick_device(device), pick_dtype(dtype)
        t0 = time.perf_counter()
        mode = offload.check_mode(offload_mode)
        # With offload, weights are assigned on the host (memory-mapped where the file allows) and visit the
        # device per stage. The text encoder is loaded now either way, so a bad one fails at load time; with
        # offload it is dropped again (its pages were never touched) and read on first use.
        home = torch.device("cpu") if mode != "none" else dev
        nets = components.build(files, home, dt, quant, text_quant)
        tok = load_tokenizer(files)
        log.info("loaded %s (%s) on %s/%s in %.1fs", source, files.preset.name, dev, dt, time.perf_counter() - t0)
        pipe = cls(files.preset, nets.transformer, nets.autoencoder, None if mode != "none" else nets.text_encoder,
                   tok, dev, dt, source=source, files=files, offload_mode=mode)
        pipe.quant, pipe.text_quant, pipe._text_quant_request = nets.quant, nets.text_quant, text_quant
        return pipe

    # ------------------------------------------------------------ memory modes

    @property
    def text_encoder(self) -> Qwen3TextEncoder:
        if self._text_encoder is None:
            assert self.files is not None
            home = torch.device("cpu") if self.offload != "none" else self.device
            te, _ = components.load_text_encoder(self.files, home, self.dtype, self._text_quant_request)
            self._text_encoder = te
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

    def _cpu_threads(self) -> AbstractContextManager[None]:
        return offload.cpu_threads(self.preset.cpu_threads if self.device.type == "cpu" else None)

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        parked = self._parked.get(name)
        if parked is None:
            yield
            return
        with parked.visit():
            yield

    def compile(self, mode: str | None = None, decoder: bool = True, dynamic: bool | None = None,
                backend: str = "inductor") -> None:
        """Run the transformer (and the autoencoder's decoder) through `torch.compile` from now on.

        The modules are not replaced: compiled wrappers share their weights, so the plain path stays available
        (see `uncompile`). Compiling costs tens of seconds per graph; worth it on a GPU for repeated generations.
        `mode` is torch.compile's ("max-autotune", "reduce-overhead", ...). `dynamic`: True compiles graphs with
        symbolic sizes from the first call (one graph for every image size); None (torch's default) recompiles
        once, dynamically, at the first new size; False compiles one graph per size (see `kleinbild.compiling`).
        Every graph is logged and counted (`compilations`); `warm` pays for them before the first request.
        """
        if self.offload != "none":
            raise ValueError(f"compile() needs offload mode 'none' (weights moving per stage defeat it), not "
                             f"{self.offload!r}: pass --offload none (Python: offload_mode='none')")
        self._compiled["transformer"], self._counters["transformer"] = compile_counted(
            self.transformer, "transformer", mode, dynamic, backend)
        if decoder:
            self.autoencoder.prepare_upsample()
            self._compiled["decode"], self._counters["decode"] = compile_counted(
                self.autoencoder.decode, "decode", mode, dynamic, backend)

    def uncompile(self) -> None:
        self._compiled.clear()

    @property
    def compilations(self) -> dict[str, int]:
        """Graphs compiled so far per compiled module (kept across `uncompile`)."""
        return {name: c.graphs for name, c in self._counters.items()}

    def warm(self, sizes: Sequence[tuple[int, int]], batches: Sequence[int] = (1,)) -> dict[str, int]:
        """Generate once (one step) at each (width, height) and batch size, so that compiling happens now and not on
        a request; returns `compilations` after it."""
        for w, h in sizes:
            for n in batches:
                self.generate("warm-up", width=w, height=h, steps=1, seed=0, num_images=n)
        return self.compilations

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
        host = lora_host.host(self.transformer)
        added = host.add(weights, scale, name=name, device=self.device, dtype=self.dtype)
        if fuse:
            host.fuse([added])
        return added

    def set_lora_scale(self, name: str, scale: float) -> None:
        lora_host.host(self.transformer).set_scale(name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Detach one LoRA by name, or all of them."""
        lora_host.host(self.transformer).remove(name)

    def fuse_loras(self, names: Sequence[str] | None = None) -> None:
        lora_host.host(self.transformer).fuse(names)

    def unfuse_loras(self, names: Sequence[str] | None = None) -> None:
        lora_host.host(self.transformer).unfuse(names)

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
            # Its touched pages go back to the page cache, out of this process; a GGUF's mapping outlives the
            # tensors (the file's reader is kept for the next load), so its pages are released explicitly.
            if self.files is not None and self.files.text_layout == "gguf":
                release_file_pages([*te.parameters(), *te.buffers()])
            self._text_encoder = None
        return check_finite(out, "text encoder", self.dtype)  # before any cache can keep it

    def prompt_tokens(self, prompt: str) -> int:
        """How many tokens of the text encoder's input the prompt fills (chat template included, padding not)."""
        return int(self.tokenizer.encode([prompt], self.preset.text.max_length)[1].sum())

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> list[Tensor]:
        """Each prepared reference image -> (1, C, h, w) normalised latent."""
        with self._stage("autoencoder"):
            return [check_finite(self.autoencoder.encode(to_tensor(im).to(self.device, self.dtype)),
                                 "autoencoder's encoder", self.dtype) for im in images]

    @torch.inference_mode()
    def decode(self, latent: Tensor) -> list[Image.Image]:
        with self._stage("autoencoder"):
            decode = self._compiled.get("decode", self.autoencoder.decode)
            return to_pil(check_finite(decode(latent.to(self.device, self.dtype)), "autoencoder's decoder", self.dtype))

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
        return cached_prompts(self.prompt_cache, prompts, stats, self.encode_prompt)

    def _cached_references(self, req: Request, stats: dict[str, Any]) -> list[Tensor]:
        return cached_latents(self.reference_cache, req.references, req.reference_digests, stats,
                              lambda im: self.encode_images([im])[0])

    # ------------------------------------------------------------ generate

    def request(self, prompt: str, images: Sequence[ImageInput] | ImageInput | None = None, **options: Any
                ) -> Request:
        """Validate a request for this model; `options` are `kleinbild.request.validate`'s keywords (generate()'s,
        and `max_pixels`). Nothing runs yet."""
        return validate(self.preset, prompt, images, **options)

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
        mask: MaskInput | None = None,
        strength: float | None = None,
        mask_crop: int | None = None,
        expand: tuple[int, int, int, int] | None = None,
        keep_unmasked: bool = False,
        cache: str | None = None,
        cache_threshold: float | None = None,
        literal_prompt: bool = False,
    ) -> GenerationResult:
        """Text-to-image (no image), edit (one) or multi-reference generation (several).

        Returns the images and the settings used (seed, size, steps, guidance, ...); image i has seed + i, so any
        one of them can be made again alone (`result.image_settings(i)`). `noise` (n, C, H/16, W/16) replaces the
        seeded initial noise. A callback that raises `GenerationCancelled` stops the run after that step; the
        exception propagates.

        Masked editing: with a `mask` (white = repaint, the first image's size) the first image is edited and the
        rest are references; `strength` in (0, 1] starts part way (without a mask: image-to-image); `mask_crop=PAD`
        edits a crop around the mask and stitches it back; `expand=(left, top, right, bottom)` outpaints;
        `keep_unmasked` returns the source's own pixels outside the mask. See `kleinbild.masking`.

        Step caching (base models): `cache="first-block"` or `"teacache"` reuses the transformer's residual on steps
        that change less than `cache_threshold` (`kleinbild.step_cache`; 0 reuses nothing). Off by default.

        nano completes a plain prompt ("a red circle" is read as "a big red circle at the centre",
        `kleinbild.prompt_fill`); `literal_prompt=True` encodes it as written.
        """
        req = self.request(prompt, images, width=width, height=height, steps=steps, guidance=guidance,
                           negative_prompt=negative_prompt, seed=seed, num_images=num_images, noise=noise,
                           mask=mask, strength=strength, mask_crop=mask_crop, expand=expand,
                           keep_unmasked=keep_unmasked, cache=cache, cache_threshold=cache_threshold,
                           literal_prompt=literal_prompt)
        return self.run([req], callback)[0]

    def generate_batch(
        self, requests: Sequence[Request | Mapping[str, Any]], callback: ProgressCallback | None = None,
        *, callbacks: Sequence[ProgressCallback | None] | None = None,
    ) -> list[GenerationResult]:
        """Several requests in as few batched forward passes as their shapes allow.

        Each request is a `Request` or a mapping of generate()'s arguments (`prompt` and `images` included; a
        mapping's own `callback` gets that request's rows of the latent, as does `callbacks[i]`). Requests with
        equal `batch_key()` run as one batch; the others as further batches, in order of first appearance.
        `callback` sees each batch's whole latent and may raise `GenerationCancelled` to stop. Every request is
        validated before anything runs, so one bad request raises `InputError` and nothing is computed. Results
        come back in request order; each one's settings say how many images shared its forward (`batch_size`).
        """
        reqs: list[Request] = []
        own = list(callbacks) if callbacks is not None else [None] * len(requests)
        if len(own) != len(requests):
            raise InputError(f"{len(own)} callbacks for {len(requests)} requests; pass one per request or none")
        for i, item in enumerate(requests):
            if isinstance(item, Request):
                reqs.append(item)
                continue
            if not isinstance(item, Mapping):
                raise InputError(f"request {i} is a {type(item).__name__}; pass a Request or a dict of generate() "
                                 "arguments")
            args = dict(item)
            if "prompt" not in args:
                raise InputError(f"request {i} has no prompt", "prompt")
            own[i] = args.pop("callback", None) or own[i]
            try:
                reqs.append(self.request(args.pop("prompt"), args.pop("images", None), **args))
            except TypeError as e:
                raise InputError(f"request {i}: {e}") from None
        return self.run(reqs, callback, own)

    def run(self, requests: Sequence[Request], callback: ProgressCallback | None = None,
            callbacks: Sequence[ProgressCallback | None] | None = None) -> list[GenerationResult]:
        """Run validated requests, batching those that share a `batch_key()`; results in request order."""
        own = list(callbacks) if callbacks is not None else [None] * len(requests)
        with self._cpu_threads():
            return self._run(requests, callback, own)

    def _run(self, requests: Sequence[Request], callback: ProgressCallback | None,
             own: list[ProgressCallback | None]) -> list[GenerationResult]:
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(req.batch_key(), []).append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        for idx in groups.values():
            batch = [(requests[i], own[i]) for i in idx]
            for i, res in zip(idx, self._run_group(batch, callback), strict=True):
                results[i] = res
        return results  # type: ignore[return-value]

    def _run_group(self, batch: list[tuple[Request, ProgressCallback | None]], callback: ProgressCallback | None
                   ) -> list[GenerationResult]:
        """Sample and decode requests that share a batch key, all in one batch."""
        t_start = time.perf_counter()
        stats: list[dict[str, Any]] = [{} for _ in batch]
        timings: dict[str, float] = {}
        latent = self._sample_group(batch, stats, timings, callback)
        t0 = time.perf_counter()
        out = self.decode(latent)
        timings["decode"] = time.perf_counter() - t0
        common = {
            "model": self.preset.name, "source": self.source, "dtype": str(self.dtype).removeprefix("torch."),
            "quant": self.quant, "text_quant": self.text_quant, "compiled": self.compiled, "device": str(self.device),
            "loras": [{"name": x["name"], "source": x["source"], "scale": x["scale"]} for x in self.loras],
            "seconds": round(time.perf_counter() - t_start, 3),
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "batch_size": sum(req.num_images for req, _ in batch),
        }
        results, at = [], 0
        for (req, _), st in zip(batch, stats, strict=True):
            st["saved_seconds"] = round(st.get("saved_seconds", 0.0), 4)
            images = out[at : at + req.num_images]
            if req.edit is not None:
                images = [masking.finish(im, req.edit, req.references[0]) for im in images]
            counts = st.pop("step_cache", None)  # how many steps the step cache computed and reused
            settings = {**req.settings(), **common, "cache": st}
            if counts is not None:
                settings["step_cache"] = {**settings["step_cache"], **counts}
            results.append(GenerationResult(images, settings))
            at += req.num_images
        return results

    def _text_batch(self, reqs: list[Request], stats: list[dict[str, Any]], cfg: bool) -> Tensor:
        """Prompt embeddings, one row per image: [uncond x N, cond x N] with CFG (the layout cfg_combine splits)."""
        counts = [r.num_images for r in reqs]
        if cfg:
            prompts = [x for r in reqs for x in (r.negative_prompt or "", r.text)]
            per = [st for st in stats for _ in range(2)]
        else:
            prompts, per = [r.text for r in reqs], stats
        emb = self._cached_prompts(prompts, per)

        def rows(embs: list[Tensor]) -> Tensor:
            return torch.cat([e.expand(n, -1, -1) for e, n in zip(embs, counts, strict=True)])

        return torch.cat([rows(emb[0::2]), rows(emb[1::2])]) if cfg else rows(emb)

    def _reference_batch(self, reqs: list[Request], stats: list[dict[str, Any]], rows: int, cfg: bool
                         ) -> tuple[Tensor | None, Tensor | None, list[Tensor]]:
        """Reference tokens for every row of the batch, their position ids (None, None without references), and
        each request's first reference latent (the image an edit works on)."""
        if not reqs[0].references:
            return None, None, []
        per_req, lat, firsts = [], [], []
        for r, st in zip(reqs, stats, strict=True):
            lat = self._cached_references(r, st)
            firsts.append(lat[0])
            per_req.append(torch.cat([sampling.pack(z) for z in lat], dim=1))
        if len(reqs) == 1:
            ref_tok = per_req[0].expand(rows, -1, -1)
        else:
            ref_tok = torch.cat([t.expand(r.num_images, -1, -1) for t, r in zip(per_req, reqs, strict=True)])
            if cfg:
                ref_tok = torch.cat([ref_tok, ref_tok])
        ids = sampling.reference_ids([tuple(z.shape[-2:]) for z in lat], self.preset.ref_time_offset)
        return ref_tok, ids.to(self.device), firsts

    @torch.inference_mode()
    def _sample_group(
        self,
        batch: list[tuple[Request, ProgressCallback | None]],
        stats: list[dict[str, Any]],
        timings: dict[str, float],
        callback: ProgressCallback | None,
    ) -> Tensor:
        p, dev, dt = self.preset, self.device, self.dtype
        reqs = [r for r, _ in batch]
        first = reqs[0]
        th, tw = first.height // p.ae.downscale, first.width // p.ae.downscale
        guidance = first.guidance
        cfg = guidance is not None

        t0 = time.perf_counter()
        txt = self._text_batch(reqs, stats, cfg)
        timings["text"] = time.perf_counter() - t0
        txt_ids = sampling.text_ids(txt.shape[1]).to(dev)
        img_ids = sampling.image_ids(th, tw).to(dev)
        t0 = time.perf_counter()
        ref_tok, ref_ids, sources = self._reference_batch(reqs, stats, txt.shape[0], cfg)
        timings["references"] = time.perf_counter() - t0

        timesteps = sampling.schedule(first.steps, th * tw, p.schedule_shift)
        kv: list[KVCache] = []
        steps = StepCache(first.cache) if first.cache is not None else None
        # The cache decides per step in Python, so a cached run stays eager (a compiled graph would break there).
        model = self.transformer if steps is not None else self._compiled.get("transformer", self.transformer)

        cached = {} if steps is None else {"step_cache": steps}

        def velocity(x: Tensor, t: Tensor, i: int) -> Tensor:
            xin = sampling.pack(x).to(dt)
            if cfg:
                xin, t = torch.cat([xin, xin]), torch.cat([t, t])
            if p.kv_cache_refs and ref_tok is not None and i == 0:
                v, cache = self.transformer.extract_kv(xin, img_ids, txt, txt_ids, t, ref_tok, ref_ids, **cached)
                kv.append(cache)
            elif p.kv_cache_refs and ref_tok is not None:
                v = model(xin, img_ids, txt, txt_ids, t, kv_cache=kv[0], **cached)
            else:
                v = model(xin, img_ids, txt, txt_ids, t, ref=ref_tok, ref_ids=ref_ids, **cached)
            if cfg:
                v = sampling.cfg_combine(v.float(), guidance)
            return sampling.unpack(v, th, tw)

        def on_step(i: int, total: int, x: Tensor) -> None:
            at = 0
            for req, own in batch:
                if own is not None:
                    own(i + 1, total, x[at : at + req.num_images])
                at += req.num_images
            if callback is not None:
                callback(i + 1, total, x)

        t0 = time.perf_counter()
        noise = torch.cat([r.initial_noise(p.ae.latent_channels, p.ae.downscale) for r in reqs]).to(dev)
        x, after_step = noise, None
        if first.edit is not None:
            timesteps = timesteps[first.edit.start :]
            x, after_step = masking.start_state([r.edit for r in reqs], [r.num_images for r in reqs], sources,
                                                noise, timesteps)
        try:
            with self._stage("transformer"):
                x = sampling.euler(x, timesteps, velocity, on_step, after_step)
                return check_finite(x, "transformer", dt)
        finally:
            timings["denoise"] = time.perf_counter() - t0
            if steps is not None:
                for st in stats:
                    st["step_cache"] = {"computed_steps": steps.computed, "reused_steps": steps.reused}


__all__ = ["GenerationCancelled", "GenerationResult", "KleinPipeline", "NonFiniteError", "ProgressCallback"]
