"""Masked editing: masks read and reduced to the latent grid, crop-and-stitch, outpainting canvases, paste-back,
and the latent arithmetic of starting part way (`strength`) and re-imposing the kept region every step.

There is no FLUX.2 fill model: a masked edit samples with the source as the first reference and, after every step,
puts the source (noised to the next step's level) back where the mask is 0. The rules follow diffusers'
`Flux2KleinInpaintPipeline`: the mask is binarised at 0.5 and reduced bilinearly to the token grid; the source is
encoded once and is both the starting point and the reference; `strength` drops the first steps of the schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor

from kleinbild.cache import content_key
from kleinbild.config import ModelPreset
from kleinbild.images import InputError, cap_pixels, check_reference, open_image

MaskInput = Image.Image | np.ndarray | Tensor | str | Path
# Pixels over which an outpainting mask fades into the source, so the seam is repainted and blended.
OUTPAINT_FEATHER = 16
_LANCZOS = Image.Resampling.LANCZOS


@dataclass(frozen=True, eq=False)
class Edit:
    """What a masked or image-to-image request adds to a `Request`, resolved by `validate`.

    The request's first reference is the image the model works on (`work`, at the output size or, with a crop,
    the crop scaled to it). `canvas`/`canvas_mask` are the whole picture the result is stitched into.
    """

    strength: float
    start: int  # schedule steps skipped: int(steps - steps * strength), as diffusers counts them
    latent_mask: Tensor | None  # (1, 1, h, w) float32 in [0, 1]; None: image-to-image, nothing re-imposed
    work_mask: Image.Image | None  # "L", soft, at the output size: the paste-back's weights
    keep_unmasked: bool
    crop_box: tuple[int, int, int, int] | None = None  # where the work goes back into the canvas
    canvas: Image.Image | None = None
    canvas_mask: Image.Image | None = None
    expand: tuple[int, int, int, int] | None = None
    mask_crop: int | None = None
    mask_digest: str = ""

    def batch_key(self) -> tuple:
        return (self.strength, self.start, self.latent_mask is not None)

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"strength": self.strength, "masked": self.latent_mask is not None,
                               "keep_unmasked": self.keep_unmasked}
        if self.latent_mask is not None:
            out["mask_digest"] = self.mask_digest
        if self.mask_crop is not None:
            out["mask_crop"] = self.mask_crop
            out["crop_box"] = list(self.crop_box or ())
        if self.expand is not None:
            out["expand"] = list(self.expand)
        if self.canvas is not None:
            out["output_size"] = list(self.canvas.size)
        return out


# ---------------------------------------------------------------- resolving a request


def prepare_edit(preset: ModelPreset, images: list[Image.Image], mask: MaskInput | None, *, strength: Any,
                 steps: int, mask_crop: Any, expand: Any, keep_unmasked: Any, size: tuple[int, int] | None,
                 max_pixels: int, notes: list[str]) -> tuple[Image.Image, Edit]:
    """The image the model works on (the request's first reference) and the `Edit`, from the source
    (`images[0]`) and the mask, strength, crop and expansion asked for; InputError names what is wrong."""
    strength = _strength(strength)
    src = ImageOps.exif_transpose(images[0]).convert("RGB")
    check_reference(src, 0)
    m = None if mask is None else read_mask(mask)
    if m is not None and m.size != src.size:
        raise InputError(f"the mask is {m.width}x{m.height} but the image it edits is {src.width}x{src.height}; "
                         "give a mask of the image's size", "mask")
    ex = None if expand is None else _expand(expand)
    if ex is not None:
        src, m = outpaint(src, m, ex)
    if mask_crop is not None and m is None:
        raise InputError("mask_crop needs a mask: it crops around the masked area", "mask_crop")
    if keep_unmasked and m is None:
        raise InputError("keep_unmasked needs a mask (or expand): without one every pixel is repainted",
                         "keep_unmasked")
    cap = min(preset.max_source_pixels, max_pixels)
    if src.width * src.height > cap:
        src = cap_pixels(src, cap)
        notes.append(f"the image to edit was scaled to {src.width}x{src.height} to fit {cap / 1e6:.2f} megapixels")
        m = None if m is None else m.resize(src.size, _LANCZOS)
    mult = preset.ae.downscale
    w, h = size or (src.width // mult * mult, src.height // mult * mult)
    pad = _pad(mask_crop)
    box = None if pad is None or m is None else crop_region(m, w, h, pad)
    if box is not None:
        work, work_mask = fit_fill(src.crop(box), w, h), fit_fill(m.crop(box), w, h)  # type: ignore[union-attr]
    else:
        work = src if src.size == (w, h) else src.resize((w, h), _LANCZOS)
        work_mask = None if m is None else m if m.size == (w, h) else m.resize((w, h), _LANCZOS)
    lat = None if work_mask is None else _latent_mask(work_mask, h // mult, w // mult)
    digest = "" if m is None else content_key(b"mask", f"{m.size}".encode(), m.tobytes())
    edit = Edit(strength, start_steps(steps, strength), lat, work_mask, bool(keep_unmasked), box,
                src if box is not None else None, m if box is not None else None, ex, pad, digest)
    return work, edit


def _strength(strength: Any) -> float:
    # Any strength above 0 leaves at least the last step: int(steps - steps * s) < steps.
    s = 1.0 if strength is None else strength
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1:
        raise InputError(f"strength must be a number in (0, 1] (1 = start from pure noise), got {strength!r}",
                         "strength")
    return float(s)


def _expand(expand: Any) -> tuple[int, int, int, int]:
    if isinstance(expand, str):
        try:
            expand = [int(x) for x in expand.split(",")]
        except ValueError:
            expand = None
    ok = isinstance(expand, (list, tuple)) and len(expand) == 4 and all(
        isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 4096 for x in expand)
    if not ok:
        raise InputError(f"expand must be four pixel counts (left, top, right, bottom), each 0 to 4096, got "
                         f"{expand!r}", "expand")
    if not any(expand):
        raise InputError("expand is all zero: give the pixels to add on at least one side", "expand")
    return tuple(expand)  # type: ignore[return-value]


def _pad(mask_crop: Any) -> int | None:
    if mask_crop is None:
        return None
    if isinstance(mask_crop, bool) or not isinstance(mask_crop, int) or not 0 <= mask_crop <= 4096:
        raise InputError(f"mask_crop must be a margin in pixels from 0 to 4096, got {mask_crop!r}", "mask_crop")
    return mask_crop


def _latent_mask(work_mask: Image.Image, h: int, w: int) -> Tensor:
    if not (np.asarray(work_mask) >= 128).any():
        raise InputError("the mask has nothing to repaint: no pixel is at least half white (white = repaint)",
                         "mask")
    lat = latent_mask(work_mask, h, w)
    if not lat.any():
        raise InputError(f"the mask is too small to reach any of the {h}x{w} latent cells' centres; paint a larger "
                         "area, or pass mask_crop to edit around it at full resolution", "mask")
    return lat


# ---------------------------------------------------------------- reading masks


def read_mask(mask: MaskInput, param: str = "mask") -> Image.Image:
    """A mask as an "L" image, white (255) = repaint: from an image (its luminance; alpha is not read), a file, or
    an (H, W) array or tensor of floats in [0, 1], booleans or uint8."""
    if isinstance(mask, (str, Path)):
        mask = open_image(mask)
    if isinstance(mask, Image.Image):
        return mask.convert("L")
    if isinstance(mask, Tensor):
        mask = mask.detach().float().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise InputError(f"{param} is a {type(mask).__name__}; pass an image, a file path, or an (H, W) array",
                         param)
    arr = np.squeeze(mask)
    if arr.ndim != 2:
        raise InputError(f"{param} has shape {mask.shape}; a mask array is (H, W), one value per pixel", param)
    if arr.dtype == np.bool_:
        return Image.fromarray(arr.astype(np.uint8) * 255)
    if arr.dtype == np.uint8:
        return Image.fromarray(arr)
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise InputError(f"{param} has NaN or infinite values; give values in [0, 1] (1 = repaint)", param)
    if arr.min() < 0 or arr.max() > 1:
        raise InputError(f"{param} values must be in [0, 1] (1 = repaint), got [{arr.min():g}, {arr.max():g}]", param)
    return Image.fromarray(np.round(arr * 255).astype(np.uint8))


def alpha_mask(img: Image.Image) -> Image.Image:
    """OpenAI's mask rule: a mask with an alpha channel is read by its alpha (fully transparent = edit, so the
    mask is 255 - alpha); one without alpha by its luminance (white = edit)."""
    if has_alpha(img):
        return Image.fromarray(255 - np.asarray(img.convert("RGBA"))[..., 3])
    return img.convert("L")


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info)


# ---------------------------------------------------------------- geometry


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """The box (x1, y1, x2, y2) around every nonzero mask pixel, grown by `pad` and then to the aspect of
    width x height, kept inside the mask (diffusers' `get_crop_region` rule)."""
    m = np.asarray(mask.convert("L")) != 0
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    x1, x2 = max(int(cols[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, w)
    y1, y2 = max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, h)
    target = width / height
    if (x2 - x1) / (y2 - y1) > target:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / target - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * target - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(a: int, b: int, by: int, limit: int) -> tuple[int, int]:
    """Grow [a, b) by `by`, half each side, then shift it back inside [0, limit)."""
    a, b = a - by // 2, b + by - by // 2
    if b >= limit:
        a, b = a - (b - limit), limit
    if a < 0:
        a, b = 0, b - a
    return a, min(b, limit)


def fit_fill(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to fit inside width x height keeping the aspect, centre it, and fill the bands left over by stretching
    the edge rows or columns (diffusers' "fill" resize)."""
    ratio, src = width / height, img.width / img.height
    sw = width if ratio < src else img.width * height // img.height
    sh = height if ratio >= src else img.height * width // img.width
    small = img.resize((sw, sh), _LANCZOS)
    out = Image.new(img.mode, (width, height))
    out.paste(small, (width // 2 - sw // 2, height // 2 - sh // 2))
    if ratio < src and (band := height // 2 - sh // 2) > 0:
        out.paste(small.resize((width, band), box=(0, 0, width, 0)), (0, 0))
        out.paste(small.resize((width, band), box=(0, sh, width, sh)), (0, band + sh))
    elif ratio > src and (band := width // 2 - sw // 2) > 0:
        out.paste(small.resize((band, height), box=(0, 0, 0, height)), (0, 0))
        out.paste(small.resize((band, height), box=(sw, 0, sw, height)), (band + sw, 0))
    return out


def cover_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover width x height keeping the aspect, then centre-crop to it."""
    ratio, src = width / height, img.width / img.height
    sw = width if ratio > src else img.width * height // img.height
    sh = height if ratio <= src else img.height * width // img.width
    out = Image.new(img.mode, (width, height))
    out.paste(img.resize((sw, sh), _LANCZOS), (width // 2 - sw // 2, height // 2 - sh // 2))
    return out


def outpaint(source: Image.Image, mask: Image.Image | None, expand: tuple[int, int, int, int]
             ) -> tuple[Image.Image, Image.Image]:
    """The grown canvas and its mask: the source placed at (left, top); the new area filled with the source's edge
    pixels, blurred (so the reference shows colours, not a hard frame), and masked, the mask fading
    `OUTPAINT_FEATHER` px into the source; a given mask (of the source's size) is added where it lies."""
    left, top, right, bottom = expand
    w, h = source.size
    arr = np.pad(np.asarray(source.convert("RGB")), ((top, bottom), (left, right), (0, 0)), mode="edge")
    hard = np.full(arr.shape[:2], 255, np.uint8)
    hard[top : top + h, left : left + w] = 0
    edge = Image.fromarray(arr)
    canvas = Image.composite(edge.filter(ImageFilter.GaussianBlur(max(8, min(w, h) // 8))), edge,
                             Image.fromarray(hard))
    canvas.paste(source.convert("RGB"), (left, top))
    out = hard.copy()
    out[top : top + h, left : left + w] = _seam(w, h, expand)
    if mask is not None:
        placed = np.zeros_like(hard)
        placed[top : top + h, left : left + w] = np.asarray(mask)
        out = np.maximum(out, placed)
    return canvas, Image.fromarray(out)


def _seam(w: int, h: int, expand: tuple[int, int, int, int]) -> np.ndarray:
    """(h, w) uint8: inside the source, a ramp from 255 at each grown side down to 0 `OUTPAINT_FEATHER` px in."""
    left, top, right, bottom = expand
    x, y = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)[:, None]
    far = np.full((h, w), np.inf)
    for grown, dist in ((left, x + 0 * y), (right, w - 1 - x + 0 * y), (top, y + 0 * x), (bottom, h - 1 - y + 0 * x)):
        if grown:
            far = np.minimum(far, dist + 1)
    return np.round(255 * np.clip(1 - far / (OUTPAINT_FEATHER + 1), 0, 1)).astype(np.uint8)


# ---------------------------------------------------------------- the latent side


def latent_mask(mask: Image.Image, h: int, w: int) -> Tensor:
    """(1, 1, h, w): the mask binarised at 0.5, then bilinearly reduced to the token grid."""
    m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
    m = (m >= 0.5).float()
    return F.interpolate(m, size=(h, w), mode="bilinear")


def start_steps(steps: int, strength: float) -> int:
    """How many of the schedule's first steps `strength` skips (diffusers' count, float arithmetic included)."""
    return int(max(steps - min(steps * strength, steps), 0))


def noised(source: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """The flow-matching state at noise level sigma: sigma * noise + (1 - sigma) * source."""
    s = torch.tensor(sigma, dtype=torch.float32, device=noise.device)
    return s * noise + (1.0 - s) * source


def reimpose(x: Tensor, source: Tensor, noise: Tensor, mask: Tensor, sigma_next: float | None) -> Tensor:
    """Put the kept region (mask 0) back: the source at the next step's noise level, clean after the last step."""
    kept = source if sigma_next is None else noised(source, noise, sigma_next)
    return (1 - mask) * kept + mask * x


# ---------------------------------------------------------------- the pixel side


def finish(image: Image.Image, edit: Edit, work: Image.Image) -> Image.Image:
    """The decoded image as the user gets it: stitched into the canvas (crop), the source's own pixels outside the
    mask (keep_unmasked), or as decoded."""
    if edit.crop_box is not None and edit.canvas is not None and edit.canvas_mask is not None:
        x1, y1, x2, y2 = edit.crop_box
        full = Image.new("RGB", edit.canvas.size)
        full.paste(cover_crop(image, x2 - x1, y2 - y1), (x1, y1))
        return Image.composite(full, edit.canvas, edit.canvas_mask)
    if edit.keep_unmasked and edit.work_mask is not None:
        return Image.composite(image, work, edit.work_mask)
    return image


def start_state(edits: list[Edit | None], rows: list[int], sources: list[Tensor], noise: Tensor,
                timesteps: list[float]) -> tuple[Tensor, Callable[[int, Tensor], Tensor] | None]:
    """A batch of edits' starting latents (each source noised to the first timestep; `rows` images per edit) and,
    with masks, the step hook that re-imposes the kept region."""
    src = torch.cat([z.float().expand(n, -1, -1, -1) for z, n in zip(sources, rows, strict=True)])
    x = noised(src, noise, timesteps[0])
    first = edits[0]
    if first is None or first.latent_mask is None:
        return x, None
    masks = [e.latent_mask.expand(n, -1, -1, -1) for e, n in zip(edits, rows, strict=True)]  # type: ignore[union-attr]
    mask = torch.cat(masks).to(noise.device)
    last = len(timesteps) - 2

    def after_step(i: int, x: Tensor) -> Tensor:
        return reimpose(x, src, noise, mask, None if i == last else timesteps[i + 1])

    return x, after_step
