"""The OpenAI images protocol: reading a request body (JSON or multipart, images as files, base64 or data URIs),
checking HTTP's own fields and limits, handing the rest to the engine's one validation, and shaping answers."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.datastructures import UploadFile

from kleinbild.images import InputError
from kleinbild.masking import alpha_mask, has_alpha
from kleinbild.request import MAX_SEED
from kleinbild.serve.settings import ServerSettings
from kleinbild.serve.worker import SUCCEEDED, Delivery, Job

if TYPE_CHECKING:
    from kleinbild.pipeline import KleinPipeline


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---------------------------------------------------------------- request fields

_IMAGE_KEY = re.compile(r"^image(\[\d*\])?$")
_LOOP_PARSE_BYTES = 64 * 1024
_SIZE = re.compile(r"^\s*([0-9]{1,6})\s*[xX×]\s*([0-9]{1,6})\s*$", re.ASCII)
_INT = re.compile(r"^[+-]?[0-9]{1,20}$", re.ASCII)
# OpenAI parameters that change nothing here and are safe to accept.
_IGNORED = frozenset({"user", "safety_identifier", "quality", "style", "moderation", "input_fidelity", "complexity"})
_UNSUPPORTED = {
    "markup": "markup images are not supported",
    "svg": "SVG output is not supported",
    "frame_count": "animations are not supported",
    "frame_duration_ms": "animations are not supported",
}
_KNOWN = frozenset({
    "prompt", "n", "size", "response_format", "output_format", "output_compression", "seed", "steps", "guidance",
    "negative_prompt", "model", "background", "stream", "partial_images", "image", "images", "mask", "strength",
    "keep_unmasked", "mask_crop", "expand", "literal_prompt",
})


class Fields:
    """Typed access to request fields; multipart values arrive as text and are parsed strictly."""

    def __init__(self, values: dict[str, Any], from_form: bool):
        self.values = values
        self.from_form = from_form

    def get(self, name: str) -> Any:
        v = self.values.get(name)
        return None if v is None or (self.from_form and v == "") else v

    def text(self, name: str, *, max_len: int | None = None) -> str | None:
        v = self.get(name)
        if v is None:
            return None
        if not isinstance(v, str):
            raise _bad(f"{name} must be a string, got {_kind(v)}", name, "invalid_type")
        if max_len is not None and len(v) > max_len:
            raise _bad(f"{name} is {len(v)} characters; at most {max_len} are accepted", name,
                       "string_above_max_length")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # JSON may carry lone surrogates ("\ud800"): not text
            raise _bad(f"{name} is not valid Unicode text (it has a lone surrogate)", name, "invalid_value") from None
        return v

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        v = self.text(name)
        if v is None:
            return default
        if v not in choices:
            raise _bad(f"{name} must be one of {', '.join(choices)}; got {v!r}", name)
        return v

    def integer(self, name: str, lo: int, hi: int) -> int | None:
        v = self.get(name)
        if v is None:
            return None
        if self.from_form and isinstance(v, str) and _INT.match(v):
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise _bad(f"{name} must be an integer, got {_kind(v)}", name, "invalid_type")
        if not lo <= v <= hi:
            raise _bad(f"{name} must be between {lo} and {hi}, got {v}", name, "out_of_range")
        return v

    def number(self, name: str, lo: float, hi: float) -> float | None:
        v = self.get(name)
        if v is None:
            return None
        if self.from_form and isinstance(v, str):
            try:
                if not v.isascii():  # float() reads other scripts' digits; a number on the wire is ASCII
                    raise ValueError(v)
                v = float(v)
            except ValueError:
                raise _bad(f"{name} must be a number, got {v!r}", name, "invalid_type") from None
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise _bad(f"{name} must be a number, got {_kind(v)}", name, "invalid_type")
        try:
            v = float(v)
        except OverflowError:  # an integer too large for a float
            v = math.inf
        if not math.isfinite(v):
            raise _bad(f"{name} must be a finite number", name, "out_of_range")
        if not lo <= v <= hi:
            raise _bad(f"{name} must be between {lo:g} and {hi:g}, got {v:g}", name, "out_of_range")
        return float(v)

    def flag(self, name: str) -> bool | None:
        v = self.get(name)
        if v is None:
            return None
        if self.from_form and isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        if not isinstance(v, bool):
            raise _bad(f"{name} must be true or false, got {_kind(v)}", name, "invalid_type")
        return v


def _kind(v: Any) -> str:
    if isinstance(v, str):
        return f"the string {v[:40]!r}"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    return {dict: "an object", list: "an array"}.get(type(v), type(v).__name__)


@dataclass(frozen=True)
class Body:
    """A request body as read: its fields, the raw bytes of every reference image and of the mask (if any)."""

    fields: Fields
    images: list[bytes]
    mask: bytes | None = None


async def read_request(request: HttpRequest, settings: ServerSettings, *, allow_form: bool) -> Body:
    """The fields and the raw bytes of every image, from a JSON or (where allowed) a multipart body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json")):
        raw = await request.body()
        try:
            # A big body (base64 images) is parsed off the event loop, which must keep answering /health.
            body = json.loads(raw) if len(raw) < _LOOP_PARSE_BYTES else await asyncio.to_thread(json.loads, raw)
        except ValueError as e:  # bad UTF-8, bad JSON, or an integer past Python's 4300-digit conversion limit
            raise _bad(f"the body is not valid JSON ({str(e)[:200]})", None, "invalid_json") from None
        except RecursionError:
            raise _bad("the body's JSON is nested too deeply", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise _bad(f"the body must be a JSON object, got {_kind(body)}", None, "invalid_json")
        fields = Fields(body, from_form=False)
        images = _json_images(body, settings)
        mask = _json_mask(body)
    elif allow_form and ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=settings.max_images + 1, max_fields=64)
        except Exception as e:  # python-multipart's errors: malformed body, too many parts, part too big
            detail = getattr(e, "detail", None) or str(e) or type(e).__name__
            raise _bad(f"cannot read the multipart body: {detail}", None, "invalid_multipart") from None
        values: dict[str, Any] = {}
        images, mask = [], None
        for key, value in form.multi_items():
            if key == "mask":  # a file part, as OpenAI's clients send it, or base64 text
                if mask is not None:
                    raise _bad("mask is given twice; send one mask (for the first image)", key,
                               "duplicate_parameter")
                mask = await value.read() if isinstance(value, UploadFile) else _decode_image_string(value, key)
            elif _IMAGE_KEY.match(key):
                if isinstance(value, UploadFile):
                    images.append(await value.read())
                else:
                    images.append(_decode_image_string(value, key))
                if len(images) > settings.max_images:
                    raise _too_many_images(settings)
            elif isinstance(value, UploadFile):
                if key in _UNSUPPORTED:
                    raise _bad(_UNSUPPORTED[key], key, "unsupported_parameter")
                raise _bad(f"unexpected file part {key!r}; send reference images as 'image' or 'image[]'", key,
                           "unknown_parameter")
            elif key in values:
                raise _bad(f"{key} is given twice", key, "duplicate_parameter")
            else:
                values[key] = value
        await form.close()
        fields = Fields(values, from_form=True)
    elif not ctype:
        raise ApiError(415, f"no Content-Type; send {_accepted(allow_form)}", code="unsupported_media_type")
    else:
        accepted = _accepted(allow_form)
        raise ApiError(415, f"Content-Type {ctype!r} is not accepted here; send {accepted}",
                       code="unsupported_media_type")
    _check_names(fields.values)
    return Body(fields, images, mask)


def _accepted(allow_form: bool) -> str:
    return "application/json or multipart/form-data" if allow_form else "application/json"


def _too_many_images(settings: ServerSettings) -> ApiError:
    return _bad(f"too many images: at most {settings.max_images} references per request", "image", "too_many_images")


def _check_names(values: Mapping[str, Any]) -> None:
    for key in values:
        if key in _UNSUPPORTED:
            if values[key] not in (None, ""):
                raise _bad(_UNSUPPORTED[key], key, "unsupported_parameter")
        elif key not in _KNOWN and key not in _IGNORED:
            known = ", ".join(sorted(_KNOWN - {"images"}))
            raise _bad(f"unknown parameter {key!r}; this server takes: {known}", key, "unknown_parameter")


def _json_images(body: Mapping[str, Any], settings: ServerSettings) -> list[bytes]:
    items: list[tuple[str, Any]] = []
    for key in ("image", "images"):
        v = body.get(key)
        if v is None:
            continue
        for i, item in enumerate(v if isinstance(v, list) else [v]):
            items.append((f"{key}[{i}]" if isinstance(v, list) else key, item))
    if len(items) > settings.max_images:
        raise _too_many_images(settings)
    out = []
    for param, item in items:
        if isinstance(item, dict):
            # OpenAI's JSON form: {"image_url": "data:..."} (file_id has no meaning here).
            extra = set(item) - {"image_url", "b64_json"}
            if extra or len(item) != 1:
                raise _bad(f"{param} must be a string or {{\"image_url\": \"data:...\"}}", param, "invalid_type")
            item = next(iter(item.values()))
        if not isinstance(item, str):
            raise _bad(f"{param} must be a base64 string or a data URI, got {_kind(item)}", param, "invalid_type")
        out.append(_decode_image_string(item, param))
    return out


def _json_mask(body: Mapping[str, Any]) -> bytes | None:
    item = body.get("mask")
    if item is None:
        return None
    if isinstance(item, dict):  # OpenAI's JSON form, as for images
        if set(item) - {"image_url", "b64_json"} or len(item) != 1:
            raise _bad('mask must be a string or {"image_url": "data:..."}', "mask", "invalid_type")
        item = next(iter(item.values()))
    if not isinstance(item, str):
        raise _bad(f"mask must be a base64 string or a data URI of a PNG, got {_kind(item)}", "mask", "invalid_type")
    return _decode_image_string(item, "mask")


def _decode_image_string(text: str, param: str) -> bytes:
    s = text.strip()
    if s.lower().startswith(("http://", "https://", "file:")):
        raise _bad(f"{param}: image URLs are not fetched by this server; send the image bytes as base64 or a data "
                   "URI", param, "unsupported_image_url")
    if s.startswith("data:"):
        head, sep, s = s.partition(",")
        if not sep or not head.endswith(";base64"):
            raise _bad(f"{param}: a data URI must look like data:image/png;base64,...", param, "invalid_image")
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"{param} is not valid base64", param, "invalid_image") from None
    if not data:
        raise _bad(f"{param} is empty", param, "invalid_image")
    return data


def decode_image(data: bytes, index: int, settings: ServerSettings) -> Image.Image:
    return _open_image(data, f"image {index}", "image" if index == 0 else f"image[{index}]", settings)


def decode_mask(data: bytes, settings: ServerSettings) -> Image.Image:
    """OpenAI's mask: a PNG whose fully transparent pixels mark where to edit; one without alpha is white = edit."""
    img = _open_image(data, "the mask", "mask", settings)
    mask = alpha_mask(img)
    if has_alpha(img) and not np.asarray(mask).any():
        raise _bad("the mask has an alpha channel but no transparent pixel: its transparent pixels mark where to "
                   "edit (OpenAI's rule); make that area transparent, or send a mask without alpha (white = edit)",
                   "mask", "invalid_mask")
    return mask


def _open_image(data: bytes, what: str, param: str, settings: ServerSettings) -> Image.Image:
    if not data:
        raise _bad(f"{what} is empty", param, "invalid_image")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ApiError(413, f"{what} has too many pixels", param=param, code="image_too_large") from None
    except Exception:  # UnidentifiedImageError mostly; some plugins raise SyntaxError or ValueError on bad headers
        raise _bad(f"{what} is not a readable image; send PNG, JPEG or WebP bytes", param,
                   "invalid_image") from None
    if img.format not in ("PNG", "JPEG", "WEBP"):
        raise ApiError(415, f"{what} is {img.format}; send PNG, JPEG or WebP", param=param,
                       code="unsupported_image_format")
    w, h = img.size
    if w * h > settings.max_image_pixels:
        raise ApiError(413, f"{what} is {w}x{h}; at most {settings.max_image_pixels / 1e6:.1f} megapixels are "
                       "accepted (downscale it)", param=param, code="image_too_large")
    try:
        img.load()
    except Exception:  # truncated or corrupt: PIL raises OSError, SyntaxError, ValueError... by codec
        raise _bad(f"{what} is corrupt or truncated", param, "invalid_image") from None
    return img


def build_job(body: Body, kind: str, pipe: KleinPipeline, settings: ServerSettings, model_ids: tuple[str, ...]
              ) -> Job:
    """Validate everything before the job is queued, so a bad request costs no model time and says what is wrong.

    HTTP's own fields and limits are checked here; the rest is the engine's one validation (`pipe.request`)."""
    fields, images = body.fields, body.images
    model = fields.text("model")
    if model is not None and model not in model_ids:
        raise ApiError(404, f"model {model!r} is not served here; this server runs {model_ids[0]!r} "
                       "(or leave model out)", param="model", code="model_not_found")
    prompt = fields.text("prompt", max_len=settings.max_prompt_chars)
    if prompt is None or not prompt.strip():
        raise _bad("prompt is required and must not be empty", "prompt", "missing_required_parameter")
    delivery = _delivery(fields, kind, pipe.preset.ae.downscale)
    width, height = _size(fields)
    if kind == "edit" and not images:
        raise _bad("an edit needs at least one reference image ('image' parts, or base64 in 'image'/'images')",
                   "image", "missing_required_parameter")
    if len(images) > settings.max_images:
        raise _too_many_images(settings)
    pil = [decode_image(b, i, settings) for i, b in enumerate(images)]
    n = fields.integer("n", 1, settings.max_n) or 1
    args = dict(width=width, height=height, steps=fields.integer("steps", 1, settings.max_steps),
                guidance=fields.number("guidance", 0.0, 100.0),
                negative_prompt=fields.text("negative_prompt", max_len=settings.max_prompt_chars),
                seed=fields.integer("seed", 0, MAX_SEED - settings.max_n), num_images=n,
                max_pixels=settings.max_pixels, literal_prompt=bool(fields.flag("literal_prompt")),
                **_edit_args(fields, body.mask, settings))
    try:
        request = pipe.request(prompt, pil, **args)
    except InputError as e:
        param = _PARAMS.get(e.param or "", e.param)
        raise _bad(str(e), param, "invalid_image" if param == "image" else "invalid_value") from None
    except Exception as e:  # an odd mode or a codec error on conversion: still the image's fault
        raise _bad(f"cannot use the image: {type(e).__name__}: {e}", "image", "invalid_image") from None
    return Job(request, delivery)


def _edit_args(fields: Fields, mask: bytes | None, settings: ServerSettings) -> dict[str, Any]:
    """Masked editing's fields. keep_unmasked defaults to on with a mask: what a user did not paint stays as it was."""
    expand = fields.get("expand")
    if expand is not None and not isinstance(expand, str) and not (isinstance(expand, list) and len(expand) == 4):
        raise _bad(f"expand must be four pixel counts [left, top, right, bottom] (or 'L,T,R,B'), got {_kind(expand)}",
                   "expand", "invalid_type")
    keep = fields.flag("keep_unmasked")
    if keep is None:
        keep = mask is not None or expand is not None
    return dict(mask=None if mask is None else decode_mask(mask, settings),
                strength=fields.number("strength", 0.0, 1.0), mask_crop=fields.integer("mask_crop", 0, 4096),
                expand=expand, keep_unmasked=keep)


# The engine's names for what the OpenAI API calls otherwise.
_PARAMS = {"width": "size", "height": "size", "num_images": "n", "images": "image"}


def _delivery(fields: Fields, kind: str, downscale: int) -> Delivery:
    if fields.flag("stream"):
        raise _bad("stream=true is not supported; use POST /v1/jobs and GET /v1/jobs/{id}/events for progress",
                   "stream", "unsupported_parameter")
    if fields.integer("partial_images", 0, 10):
        raise _bad("partial_images are not supported; /v1/jobs/{id}/events streams previews", "partial_images",
                   "unsupported_parameter")
    background = fields.choice("background", ("auto", "opaque", "transparent"), "auto")
    if background == "transparent":
        raise _bad("transparent backgrounds are not supported (the model paints every pixel)", "background",
                   "unsupported_parameter")
    response_format = fields.choice("response_format", ("b64_json", "url"), "b64_json")
    output_format = fields.choice("output_format", ("png", "jpeg", "webp"), "png")
    compression = fields.integer("output_compression", 0, 100)
    notes = ("output_compression applies to jpeg and webp; png is lossless",) if (
        compression is not None and output_format == "png") else ()
    return Delivery(response_format, output_format, 100 if compression is None else compression, kind, notes,
                    downscale=downscale)


def _size(fields: Fields) -> tuple[int | None, int | None]:
    """WIDTHxHEIGHT, or (None, None) for auto: the engine's default (the first reference's size, fitted)."""
    size = fields.text("size")
    if size is None or size.strip().lower() == "auto":
        return None, None
    match = _SIZE.match(size)
    if not match:
        raise _bad(f"size must be WIDTHxHEIGHT (e.g. 1024x768) or auto, got {size!r}", "size", "invalid_size")
    return int(match.group(1)), int(match.group(2))


# ---------------------------------------------------------------- responses


def images_response(job: Job, base_url: str) -> dict[str, Any]:
    s, d, st = job.request, job.delivery, job.settings
    data = []
    for out in job.outputs:
        item: dict[str, Any] = {"seed": out.seed}
        if out.file_id is not None:
            item["url"] = f"{base_url}/v1/files/{out.file_id}"
        else:
            item["b64_json"] = base64.b64encode(out.data).decode()
        data.append(item)
    ds = d.downscale
    text_tokens = int(st.get("text_tokens", 0))
    image_tokens = sum((w // ds) * (h // ds) for w, h in job.reference_sizes)
    out_tokens = len(job.outputs) * (s.width // ds) * (s.height // ds)
    return {
        "created": int(job.created),
        "data": data,
        "background": "opaque",
        "output_format": d.output_format,
        "size": "{}x{}".format(*s.output_size),
        "usage": {
            "input_tokens": text_tokens + image_tokens,
            "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": image_tokens},
            "output_tokens": out_tokens,
            "output_tokens_details": {"image_tokens": out_tokens, "text_tokens": 0},
            "total_tokens": text_tokens + image_tokens + out_tokens,
        },
        # Extensions: what reproduces each image, and what the request cost.
        "kleinbild": {
            "job": job.id,
            "model": st.get("model"),
            "seeds": [o.seed for o in job.outputs],
            "steps": s.steps,
            "guidance": s.guidance,
            "references": len(job.reference_sizes),
            "batch_size": job.batch_size,
            "seconds": st.get("seconds"),
            "timings": st.get("timings", {}),
            "cache": st.get("cache", {}),
            "notes": st.get("notes", []),
            **({"replica": st["replica"]} if "replica" in st else {}),
            **({"edit": {k: st[k] for k in _EDIT_KEYS if k in st}} if "strength" in st else {}),
        },
    }


# What a masked or image-to-image result says of its edit (from the engine's settings).
_EDIT_KEYS = ("strength", "masked", "keep_unmasked", "mask_crop", "crop_box", "expand")


def job_view(job: Job, base_url: str) -> dict[str, Any]:
    s, d = job.request, job.delivery
    return {
        "id": job.id,
        "object": "image.job",
        "status": job.state,
        "kind": d.kind,
        "created_at": int(job.created),
        "started_at": None if job.started is None else int(job.started),
        "finished_at": None if job.finished is None else int(job.finished),
        "progress": {"step": job.step, "total": job.total or s.steps},
        "batch_size": job.batch_size,
        "request": {"prompt": s.prompt, "size": "{}x{}".format(*s.output_size), "n": s.num_images,
                    "seeds": list(s.seeds), "steps": s.steps, "guidance": s.guidance,
                    "references": len(job.reference_sizes), "response_format": d.response_format,
                    "output_format": d.output_format},
        "result": images_response(job, base_url) if job.state == SUCCEEDED else None,
        "error": job.error.body()["error"] if job.error else None,
    }


def base_url(request: HttpRequest) -> str:
    return str(request.base_url).rstrip("/")


