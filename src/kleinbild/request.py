"""The one request type: a generation request, validated once, before any model runs.

`validate` resolves everything (size rounding and minimum side, steps and guidance defaults, the seed, the
prepared references) and records why anything changed (`notes`); `generate`, `generate_batch`, the CLI and the
server all build a `Request` with it, and everything downstream trusts it. The server adds only its own limits.

Seeds: image i of a request with seed s is the image of seed s + i alone, so any image of a batch can be made
again by itself, and a request can be split into chunks without changing a pixel.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from kleinbild import sampling
from kleinbild.cache import content_key
from kleinbild.config import ModelPreset
from kleinbild.images import MAX_PIXELS, MIN_SIDE, InputError, open_image, prepare_reference
from kleinbild.masking import Edit, MaskInput, prepare_edit
from kleinbild.prompt_fill import complete_prompt
from kleinbild.step_cache import CACHE_MODES, DEFAULT_THRESHOLDS, CacheSpec

log = logging.getLogger(__name__)

ImageInput = Image.Image | str | Path
# Seeds of a request stay below this, so seed + i is a valid seed for torch and a safe integer for JSON readers.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True, eq=False)
class Request:
    """A validated request: what the engine runs, and what reproduces each of its images."""

    prompt: str
    negative_prompt: str | None  # None: the model runs without CFG
    references: tuple[Image.Image, ...]  # prepared: RGB, capped, cropped to the token grid
    width: int
    height: int
    steps: int
    guidance: float | None  # None: guidance-distilled
    seed: int | None  # image i uses seed + i; None when `noise` was given
    num_images: int
    noise: Tensor | None = field(default=None, repr=False)
    notes: tuple[str, ...] = ()
    reference_digests: tuple[str, ...] = ()  # content keys of the prepared references (cache keys, metadata)
    edit: Edit | None = None  # masked editing or image-to-image: references[0] is the image worked on
    cache: CacheSpec | None = None  # step caching (kleinbild.step_cache); None: every step computed in full
    completed_prompt: str | None = None  # what the text encoder reads instead (kleinbild.prompt_fill)
    literal_prompt: bool = False  # the prompt is encoded as written, never completed

    @property
    def text(self) -> str:
        """The prompt the text encoder reads: the completed one where the preset completed it."""
        return self.completed_prompt or self.prompt

    @property
    def seeds(self) -> tuple[int, ...]:
        """Each image's own seed (empty when the noise was given)."""
        if self.seed is None:
            return ()
        return tuple(self.seed + i for i in range(self.num_images))

    @property
    def output_size(self) -> tuple[int, int]:
        """The images' (width, height): the model's, or with crop-and-stitch the whole picture the crop goes into."""
        if self.edit is not None and self.edit.canvas is not None:
            return self.edit.canvas.size
        return self.width, self.height

    def batch_key(self) -> tuple:
        """Requests with equal keys can share every forward pass (prompts, references and seeds may differ)."""
        return (self.width, self.height, self.steps, self.guidance, tuple(r.size for r in self.references),
                None if self.edit is None else self.edit.batch_key(), self.cache)

    def initial_noise(self, channels: int, downscale: int) -> Tensor:
        """(n, C, H/m, W/m) float32 on the CPU: the given noise, or one seeded draw per image."""
        if self.noise is not None:
            return self.noise
        assert self.seed is not None
        return sampling.make_noise(self.num_images, channels, self.height // downscale, self.width // downscale,
                                   self.seed)

    def settings(self) -> dict[str, Any]:
        """What the request resolved to, as plain data (the part of a result's settings that the request decides)."""
        return {
            "prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
            "seeds": list(self.seeds), "steps": self.steps, "guidance": self.guidance, "width": self.width,
            "height": self.height, "num_images": self.num_images,
            "references": [list(r.size) for r in self.references],
            "reference_digests": list(self.reference_digests), "notes": list(self.notes),
            **({} if self.edit is None else self.edit.settings()),
            "step_cache": None if self.cache is None else self.cache.summary(),
            **({} if self.completed_prompt is None else {"completed_prompt": self.completed_prompt}),
            **({"literal_prompt": True} if self.literal_prompt else {}),
        }

    def split(self, size: int) -> list[Request]:
        """Consecutive chunks of at most `size` images; by the seed rule they make the same images as the whole."""
        if self.num_images <= size:
            return [self]
        out = []
        for start in range(0, self.num_images, size):
            n = min(size, self.num_images - start)
            noise = None if self.noise is None else self.noise[start : start + n]
            seed = None if self.seed is None else self.seed + start
            out.append(replace(self, seed=seed, num_images=n, noise=noise))
        return out


def validate(
    preset: ModelPreset,
    prompt: Any,
    images: Sequence[ImageInput] | ImageInput | None = None,
    *,
    width: Any = None,
    height: Any = None,
    steps: Any = None,
    guidance: Any = None,
    negative_prompt: Any = None,
    seed: Any = None,
    num_images: Any = 1,
    noise: Tensor | None = None,
    max_pixels: int = MAX_PIXELS,
    mask: MaskInput | None = None,
    strength: Any = None,
    mask_crop: Any = None,
    expand: Any = None,
    keep_unmasked: Any = False,
    cache: Any = None,
    cache_threshold: Any = None,
    literal_prompt: Any = False,
) -> Request:
    """Check and resolve one request for `preset`; raises InputError naming the bad value (and its `param`).

    `max_pixels` bounds the output: an explicit size over it is refused, a default one (the first reference's
    size, or the preset's) is scaled down to fit, keeping its aspect. With a `mask`, `strength`, `mask_crop`,
    `expand` or `keep_unmasked` the first image is the one edited (see `kleinbild.masking.prepare_edit`).
    `cache` ("first-block" or "teacache") with `cache_threshold` turns on step caching (`kleinbild.step_cache`).
    A text-to-image prompt for a model with a closed vocabulary (nano) that leaves sizes or positions out is
    completed before encoding (`kleinbild.prompt_fill`) unless `literal_prompt`.
    """
    notes: list[str] = []
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a string, got {type(prompt).__name__}", "prompt")
    if not _is_int(num_images) or num_images < 1:
        raise InputError(f"num_images must be a positive integer, got {num_images!r}", "num_images")
    steps = preset.default_steps if steps is None else steps
    if not _is_int(steps) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}", "steps")
    guidance, negative_prompt = _guidance(preset, guidance, negative_prompt, notes)
    step_cache = _cache(cache, cache_threshold)
    edit_args = {"mask": mask, "strength": strength, "mask_crop": mask_crop, "expand": expand,
                 "keep_unmasked": keep_unmasked or None}
    edit = None
    if any(v is not None for v in edit_args.values()):
        refs, edit = _edit(preset, images, edit_args, steps, width, height, max_pixels, notes)
        w, h = refs[0].size
    else:
        refs = _references(preset, images)
        w, h = _size(preset, width, height, refs, max_pixels, notes)
    _untrained_size(preset, w, h, notes)
    if not isinstance(literal_prompt, bool):
        raise InputError(f"literal_prompt must be true or false, got {literal_prompt!r}", "literal_prompt")
    completed = None
    if not refs:
        _unknown_objects(preset, prompt, notes)
        completed = None if literal_prompt else complete_prompt(preset, prompt)
        if completed is not None:
            notes.append(f'{preset.name} reads this prompt as "{completed}" (it draws best with every size and '
                         "position named; literal_prompt keeps the prompt as written)")
    seed = _seed(seed, num_images, noise, (num_images, preset.ae.latent_channels, h // preset.ae.downscale,
                                              w // preset.ae.downscale))
    digests = tuple(content_key(b"reference", im.mode.encode(), f"{im.size}".encode(), im.tobytes()) for im in refs)
    return Request(prompt, negative_prompt, tuple(refs), w, h, steps, guidance, seed, num_images, noise,
                   tuple(notes), digests, edit, step_cache, completed, literal_prompt)


def _cache(mode: Any, threshold: Any) -> CacheSpec | None:
    if mode is None or mode == "none":
        if threshold is not None:
            raise InputError(f"cache_threshold {threshold!r} needs a cache: pass cache= one of "
                             f"{', '.join(CACHE_MODES)}", "cache_threshold")
        return None
    if mode not in CACHE_MODES:
        raise InputError(f"cache must be one of {', '.join(CACHE_MODES)} or none, got {mode!r}", "cache")
    threshold = DEFAULT_THRESHOLDS[mode] if threshold is None else threshold
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not (
            math.isfinite(threshold) and threshold >= 0):
        raise InputError(f"cache_threshold must be a finite number >= 0 (0: no step reused), got {threshold!r}",
                         "cache_threshold")
    return CacheSpec(mode, float(threshold))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _guidance(preset: ModelPreset, guidance: Any, negative_prompt: Any, notes: list[str]
              ) -> tuple[float | None, str | None]:
    if not preset.uses_cfg:
        if guidance is not None:
            notes.append(f"guidance {guidance} ignored: {preset.name} is guidance-distilled")
        if negative_prompt:
            notes.append(f"negative prompt ignored: {preset.name} runs without CFG")
        for note in notes:
            log.warning(note)
        return None, None
    if guidance is None:
        guidance = preset.default_guidance
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise InputError(f"guidance must be a finite number, got {guidance!r}", "guidance")
    negative_prompt = "" if negative_prompt is None else negative_prompt
    if not isinstance(negative_prompt, str):
        raise InputError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}", "negative_prompt")
    return float(guidance), negative_prompt


def _images(images: Sequence[ImageInput] | ImageInput | None) -> list[Any]:
    if images is None:
        return []
    items = [images] if isinstance(images, (Image.Image, str, Path)) else list(images)
    try:
        return [open_image(im) if isinstance(im, (str, Path)) else im for im in items]
    except InputError as e:
        raise InputError(str(e), e.param or "images") from None


def _references(preset: ModelPreset, images: Sequence[ImageInput] | ImageInput | None, first: int = 0,
                total: int | None = None) -> list[Image.Image]:
    """Each image prepared as a reference; `first` numbers them in messages, `total` (all images of the request)
    picks the cap."""
    pil = _images(images)
    n = len(pil) if total is None else total
    cap = preset.max_ref_pixels_single if n == 1 else preset.max_ref_pixels_multi
    try:
        return [prepare_reference(im, cap, preset.ae.downscale, first + i) for i, im in enumerate(pil)]
    except InputError as e:
        raise InputError(str(e), e.param or "images") from None


def _edit(preset: ModelPreset, images: Sequence[ImageInput] | ImageInput | None, args: dict[str, Any], steps: int,
          width: Any, height: Any, max_pixels: int, notes: list[str]) -> tuple[list[Image.Image], Edit]:
    """A masked or image-to-image edit: the image worked on, then the other references; the source sets the size."""
    pil = _images(images)
    if not pil:
        name = next(k for k, v in args.items() if v is not None)
        raise InputError(f"{name} needs the image it edits: pass images=[source, ...] (the first image is edited)",
                         name)
    if not isinstance(pil[0], Image.Image):
        raise InputError(f"the image to edit is a {type(pil[0]).__name__}; pass a PIL image or a file path", "images")
    size = None
    if width is not None or height is not None:
        size = _size(preset, width, height, [pil[0]], max_pixels, notes)
    try:
        work, edit = prepare_edit(preset, pil, args["mask"], strength=args["strength"], steps=steps,
                                  mask_crop=args["mask_crop"], expand=args["expand"],
                                  keep_unmasked=args["keep_unmasked"], size=size, max_pixels=max_pixels, notes=notes)
    except InputError as e:
        raise InputError(str(e), e.param or "images") from None
    return [work, *_references(preset, pil[1:], first=1, total=len(pil))], edit


def _size(preset: ModelPreset, width: Any, height: Any, refs: list[Image.Image], max_pixels: int,
          notes: list[str]) -> tuple[int, int]:
    m = preset.ae.downscale
    if width is None and height is None:
        return _default_size(preset, refs, max_pixels, notes)
    default = refs[0].size if refs else (preset.default_size, preset.default_size)
    width = default[0] if width is None else width
    height = default[1] if height is None else height
    for name, v in (("width", width), ("height", height)):
        if not _is_int(v):
            raise InputError(f"{name} must be an integer number of pixels, got {v!r}", name)
    w, h = (width // m) * m, (height // m) * m
    if w < MIN_SIDE or h < MIN_SIDE:
        raise InputError(f"size {width}x{height} is too small; both sides must be at least {MIN_SIDE} px", "width")
    if w * h > max_pixels:
        raise InputError(f"size {w}x{h} is {w * h / 1e6:.2f} megapixels; at most {max_pixels / 1e6:.2f} "
                         f"({_square(max_pixels, m)}) are allowed", "width")
    if (w, h) != (width, height):
        notes.append(f"size {width}x{height} rounded down to {w}x{h} (a multiple of {m})")
    return w, h


def _default_size(preset: ModelPreset, refs: list[Image.Image], max_pixels: int, notes: list[str]
                  ) -> tuple[int, int]:
    """The first reference's size (already a multiple of the token size), else the preset's, fitted to the bound."""
    m = preset.ae.downscale
    w, h = refs[0].size if refs else (preset.default_size, preset.default_size)
    if w * h <= max_pixels:
        return w, h
    s = math.sqrt(max_pixels / (w * h))
    fw, fh = max(MIN_SIDE, int(w * s) // m * m), max(MIN_SIDE, int(h * s) // m * m)
    if fw * fh > max_pixels:
        raise InputError(f"the default size {w}x{h} cannot fit {max_pixels} pixels; pass a size", "width")
    notes.append(f"size {w}x{h} scaled to {fw}x{fh} to fit {max_pixels / 1e6:.2f} megapixels")
    return fw, fh


def _untrained_size(preset: ModelPreset, w: int, h: int, notes: list[str]) -> None:
    if preset.trained_pixels is None:
        return
    lo, hi = preset.trained_pixels
    if not lo <= w * h <= hi:
        side = preset.default_size
        known = f"{math.isqrt(lo)} px" if lo == hi else f"{lo / 1e6:.2f}-{hi / 1e6:.2f} megapixels"
        notes.append(f"{preset.name} was trained at {known} only; at {w}x{h} expect noise rather than a picture "
                     f"(use {side}x{side})")


def _unknown_objects(preset: ModelPreset, prompt: str, notes: list[str]) -> None:
    """A text-to-image prompt that names nothing a small model can draw (nano and "a cat") gets a note saying what
    it can draw; a model with no such list (the official ones) says nothing."""
    if not preset.objects:
        return
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    if any(o in words or o + "s" in words for o in preset.objects):
        return
    example = f"a {preset.colours[0]} {preset.objects[0]} on a {preset.colours[2]} background" if len(
        preset.colours) > 2 else f"a {preset.objects[0]}"
    notes.append(f"{preset.name} draws only {_listing(preset.objects, 's')} in {_listing(preset.colours, '')}, and "
                 f"this prompt names none of those shapes: expect blobs (try \"{example}\")")


def _listing(words: tuple[str, ...], plural: str) -> str:
    items = [w + plural for w in words]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _square(max_pixels: int, m: int) -> str:
    side = int(math.isqrt(max_pixels)) // m * m
    return f"e.g. {side}x{side}"


def _seed(seed: Any, n: int, noise: Tensor | None, shape: tuple[int, ...]) -> int | None:
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise InputError(f"noise has shape {tuple(noise.shape)}; for this request it must be {shape}", "noise")
        return None
    if seed is None:
        return secrets.randbelow(2**32)
    if not _is_int(seed) or seed < 0 or seed + n - 1 > MAX_SEED:
        raise InputError(f"seed must be an integer from 0 to {MAX_SEED - n + 1} (image i uses seed + i), "
                         f"got {seed!r}", "seed")
    return seed
