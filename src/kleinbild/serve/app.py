"""HTTP shell over the engine: an OpenAI-compatible images API, async jobs with server-sent progress, metrics,
and the web playground. Imported only by `kleinbild serve` (and tests); the engine knows nothing of HTTP.

Request flow: parse and validate on the event loop (image decoding in a thread), submit a `Job` to the
`Engine` (bounded queue, one worker thread owning the pipeline), then either wait for it (the images
endpoints) or hand back its id (`/v1/jobs`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from kleinbild import __version__
from kleinbild.images import MAX_PIXELS, MIN_SIDE, InputError
from kleinbild.serve.worker import (
    FAILED,
    SUCCEEDED,
    Engine,
    EngineLimits,
    Job,
    Metrics,
    NotReady,
    OutputStore,
    QueueFull,
    Spec,
)

if TYPE_CHECKING:
    from kleinbild.pipeline import KleinPipeline

log = logging.getLogger(__name__)

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


@dataclass
class ServerSettings:
    """Limits and policies; every field is a `kleinbild serve` flag."""

    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    max_pixels: int = MAX_PIXELS  # output width * height
    max_n: int = 8
    max_images: int = 4  # reference images per request
    max_upload_bytes: int = 32 * 2**20  # whole request body
    max_image_pixels: int = 4096 * 4096  # one uploaded image, before the engine downsizes it
    max_steps: int = 100
    max_prompt_chars: int = 32000
    max_queue: int = 64
    max_batch: int = 8
    output_dir: str | None = None
    ttl: float = 3600.0  # seconds that finished jobs and url results are kept
    preview_every: int = 1  # steps between previews; 0: none
    preview_px: int = 256
    prompt_cache: int = 32
    reference_cache: int = 32
    model_id: str | None = None


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
_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*$")
_INT = re.compile(r"^[+-]?\d{1,20}$")
# OpenAI parameters that change nothing here and are safe to accept.
_IGNORED = frozenset({"user", "safety_identifier", "quality", "style", "moderation", "input_fidelity", "complexity"})
_UNSUPPORTED = {
    "mask": "masks (inpainting) are not supported; describe the change in the prompt instead",
    "markup": "markup images are not supported",
    "svg": "SVG output is not supported",
    "frame_count": "animations are not supported",
    "frame_duration_ms": "animations are not supported",
}
_KNOWN = frozenset({
    "prompt", "n", "size", "response_format", "output_format", "output_compression", "seed", "steps", "guidance",
    "negative_prompt", "model", "background", "stream", "partial_images", "image", "images",
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


async def read_request(request: Request, settings: ServerSettings, *, allow_form: bool) -> tuple[Fields, list[bytes]]:
    """The fields and the raw bytes of every image, from a JSON or (where allowed) a multipart body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json")):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _bad(f"the body is not valid JSON ({e})", None, "invalid_json") from None
        except RecursionError:
            raise _bad("the body's JSON is nested too deeply", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise _bad(f"the body must be a JSON object, got {_kind(body)}", None, "invalid_json")
        fields = Fields(body, from_form=False)
        images = _json_images(body, settings)
    elif allow_form and ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=settings.max_images + 1, max_fields=64)
        except Exception as e:  # python-multipart's errors: malformed body, too many parts, part too big
            detail = getattr(e, "detail", None) or str(e) or type(e).__name__
            raise _bad(f"cannot read the multipart body: {detail}", None, "invalid_multipart") from None
        values: dict[str, Any] = {}
        images = []
        for key, value in form.multi_items():
            if _IMAGE_KEY.match(key):
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
    return fields, images


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
    param = "image" if index == 0 else f"image[{index}]"
    if not data:
        raise _bad(f"image {index} is empty", param, "invalid_image")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ApiError(413, f"image {index} has too many pixels", param=param, code="image_too_large") from None
    except Exception:  # UnidentifiedImageError mostly; some plugins raise SyntaxError or ValueError on bad headers
        raise _bad(f"image {index} is not a readable image; send PNG, JPEG or WebP bytes", param,
                   "invalid_image") from None
    if img.format not in ("PNG", "JPEG", "WEBP"):
        raise ApiError(415, f"image {index} is {img.format}; send PNG, JPEG or WebP", param=param,
                       code="unsupported_image_format")
    w, h = img.size
    if w * h > settings.max_image_pixels:
        raise ApiError(413, f"image {index} is {w}x{h}; at most {settings.max_image_pixels / 1e6:.1f} megapixels are "
                       "accepted (downscale it)", param=param, code="image_too_large")
    try:
        img.load()
    except Exception:  # truncated or corrupt: PIL raises OSError, SyntaxError, ValueError... by codec
        raise _bad(f"image {index} is corrupt or truncated", param, "invalid_image") from None
    return img


def build_spec(fields: Fields, images: list[bytes], kind: str, pipe: KleinPipeline, settings: ServerSettings,
               model_ids: tuple[str, ...]) -> Spec:
    """Validate everything before the job is queued, so a bad request costs no model time and says what is wrong."""
    preset = pipe.preset
    notes: list[str] = []
    model = fields.text("model")
    if model is not None and model not in model_ids:
        raise ApiError(404, f"model {model!r} is not served here; this server runs {model_ids[0]!r} "
                       "(or leave model out)", param="model", code="model_not_found")
    prompt = fields.text("prompt", max_len=settings.max_prompt_chars)
    if prompt is None or not prompt.strip():
        raise _bad("prompt is required and must not be empty", "prompt", "missing_required_parameter")
    n = fields.integer("n", 1, settings.max_n) or 1
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
    if compression is not None and output_format == "png":
        notes.append("output_compression applies to jpeg and webp; png is lossless")
    seed = fields.integer("seed", 0, 2**63 - 1 - settings.max_n)
    steps = fields.integer("steps", 1, settings.max_steps) or preset.default_steps
    guidance = fields.number("guidance", 0.0, 100.0)
    negative = fields.text("negative_prompt", max_len=settings.max_prompt_chars)
    if preset.uses_cfg:
        guidance = preset.default_guidance if guidance is None else guidance
    else:
        if guidance is not None:
            notes.append(f"guidance ignored: {preset.name} is guidance-distilled")
        if negative:
            notes.append(f"negative_prompt ignored: {preset.name} runs without CFG")
        guidance, negative = None, None
    size = fields.text("size")
    if size is not None and size.strip().lower() != "auto" and not _SIZE.match(size):
        raise _bad(f"size must be WIDTHxHEIGHT (e.g. 1024x768) or auto, got {size!r}", "size", "invalid_size")

    if kind == "edit" and not images:
        raise _bad("an edit needs at least one reference image ('image' parts, or base64 in 'image'/'images')",
                   "image", "missing_required_parameter")
    if len(images) > settings.max_images:
        raise _too_many_images(settings)
    pil = [decode_image(b, i, settings) for i, b in enumerate(images)]
    try:
        refs = pipe.prepare_references(pil)
    except InputError as e:
        raise _bad(str(e), "image", "invalid_image") from None
    except Exception as e:  # an odd mode or a codec error on conversion: still the image's fault
        raise _bad(f"cannot use the image: {type(e).__name__}: {e}", "image", "invalid_image") from None

    m = preset.ae.downscale
    match = _SIZE.match(size) if size is not None else None
    if match:
        w0, h0 = int(match.group(1)), int(match.group(2))
        if w0 < MIN_SIDE or h0 < MIN_SIDE:
            raise _bad(f"size {w0}x{h0} is too small; both sides must be at least {MIN_SIDE} px", "size",
                       "invalid_size")
        w, h = (w0 // m) * m, (h0 // m) * m
        if w * h > settings.max_pixels:
            raise _bad(f"size {w0}x{h0} is {w * h / 1e6:.2f} megapixels; this server allows at most "
                       f"{settings.max_pixels / 1e6:.2f}", "size", "invalid_size")
        if (w, h) != (w0, h0):
            notes.append(f"size {w0}x{h0} rounded down to {w}x{h} (a multiple of {m})")
    else:
        w, h = refs[0].size if refs else (preset.default_size, preset.default_size)
        if w * h > settings.max_pixels:
            # auto is ours to choose: fit the allowance, keep the aspect.
            s = math.sqrt(settings.max_pixels / (w * h))
            w, h = max(MIN_SIDE, int(w * s) // m * m), max(MIN_SIDE, int(h * s) // m * m)
            if w * h > settings.max_pixels:
                raise _bad("size auto does not fit this server's --max-pixels; pass a size", "size", "invalid_size")
    seeds = [seed + i for i in range(n)] if seed is not None else [secrets.randbelow(2**32) for _ in range(n)]
    return Spec(
        prompt=prompt, negative_prompt=negative, refs=refs, width=w, height=h, steps=steps, guidance=guidance,
        seeds=seeds, response_format=response_format, output_format=output_format,
        output_compression=100 if compression is None else compression, kind=kind, notes=notes, downscale=m,
    )


# ---------------------------------------------------------------- responses


def images_response(job: Job, base_url: str) -> dict[str, Any]:
    s, st = job.spec, job.settings
    data = []
    for out in job.outputs:
        item: dict[str, Any] = {"seed": out.seed}
        if out.file_id is not None:
            item["url"] = f"{base_url}/v1/files/{out.file_id}"
        else:
            item["b64_json"] = base64.b64encode(out.data).decode()
        data.append(item)
    ds = s.downscale
    text_tokens = int(st.get("text_tokens", 0))
    image_tokens = sum((w // ds) * (h // ds) for w, h in (r.size for r in s.refs))
    out_tokens = len(job.outputs) * (s.width // ds) * (s.height // ds)
    return {
        "created": int(job.created),
        "data": data,
        "background": "opaque",
        "output_format": s.output_format,
        "size": f"{s.width}x{s.height}",
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
            "references": len(s.refs),
            "batch_size": job.batch_size,
            "seconds": st.get("seconds"),
            "timings": st.get("timings", {}),
            "cache": st.get("cache", {}),
            "notes": st.get("notes", []),
        },
    }


def job_view(job: Job, base_url: str) -> dict[str, Any]:
    s = job.spec
    return {
        "id": job.id,
        "object": "image.job",
        "status": job.state,
        "kind": s.kind,
        "created_at": int(job.created),
        "started_at": None if job.started is None else int(job.started),
        "finished_at": None if job.finished is None else int(job.finished),
        "progress": {"step": job.step, "total": job.total or s.steps},
        "batch_size": job.batch_size,
        "request": {"prompt": s.prompt, "size": f"{s.width}x{s.height}", "n": len(s.seeds), "seeds": s.seeds,
                    "steps": s.steps, "guidance": s.guidance, "references": len(s.refs),
                    "response_format": s.response_format, "output_format": s.output_format},
        "result": images_response(job, base_url) if job.state == SUCCEEDED else None,
        "error": job.error.body()["error"] if job.error else None,
    }


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


# ---------------------------------------------------------------- ASGI guards


async def _send_json(send: Callable[[dict], Awaitable[None]], status: int, body: dict,
                     headers: Mapping[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


def _error_body(message: str, code: str, param: str | None = None, type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class Guard:
    """API keys (before any body is read) and the body size limit, as plain ASGI so nothing oversized is parsed.

    The body is read here, up to the limit, and replayed to the app; after it, `receive` is the server's
    again, so disconnects still reach the handlers.
    """

    def __init__(self, app: ASGIApp, settings: ServerSettings):
        self.app = app
        self.limit = settings.max_upload_bytes
        # Digests, so the comparison time depends on neither the key's content nor its length.
        self.keys = [hashlib.sha256(k.encode()).digest() for k in settings.api_keys]

    def _needs_key(self, path: str) -> bool:
        # /v1/files/ are capability URLs (unguessable ids) so <img src> works without headers.
        api = path.startswith("/v1/") and not path.startswith("/v1/files/")
        return bool(self.keys) and (path == "/metrics" or api)

    def _authorised(self, headers: list[tuple[bytes, bytes]]) -> bool:
        given = b""
        for k, v in headers:
            if k == b"authorization":
                given = v
        scheme, _, token = given.decode("latin-1").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        ok = False
        for key in self.keys:  # no early exit: the time does not say which key (if any) matched
            ok |= hmac.compare_digest(digest, key)
        return ok and scheme.lower() == "bearer"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        if self._needs_key(scope["path"]) and not self._authorised(scope["headers"]):
            await _send_json(send, 401, _error_body(
                "missing or wrong API key; send 'Authorization: Bearer <key>'", "invalid_api_key"),
                {"WWW-Authenticate": "Bearer"})
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_json(send, 400, _error_body("bad Content-Length", "invalid_request"))
                return
            if declared > self.limit:
                await _send_json(send, 413, _error_body(
                    f"the body is {declared} bytes; at most {self.limit} are accepted", "request_too_large"))
                return
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await _send_json(send, 413, _error_body(
                    f"the body is over {self.limit} bytes, the most accepted", "request_too_large"))
                return
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _route_label(path: str) -> str:
    """Bounded label values: ids collapse into their route."""
    if path.startswith("/v1/jobs/"):
        return "/v1/jobs/{id}/events" if path.endswith("/events") else "/v1/jobs/{id}"
    if path.startswith("/v1/files/"):
        return "/v1/files/{name}"
    if path in ("/", "/health", "/metrics", "/v1/models", "/v1/images/generations", "/v1/images/edits", "/v1/jobs"):
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return "other"


class Observe:
    """Counts every request by route and status, whatever answered it (guards, handlers, errors)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def watch(msg: dict) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = _route_label(scope["path"])
            self.metrics.inc("kleinbild_http_requests_total", method=scope["method"], route=route, status=str(status))
            if not route.endswith("/events"):
                self.metrics.observe("kleinbild_http_request_seconds", time.perf_counter() - t0, route=route)


# ---------------------------------------------------------------- the app


def _model_id(pipe: KleinPipeline, settings: ServerSettings) -> str:
    if settings.model_id:
        return settings.model_id
    src = pipe.source
    if src and Path(src).expanduser().exists():
        return Path(src).name  # a local folder or file: its name, never the whole path
    return src or pipe.preset.name


def _playground() -> str:
    return resources.files("kleinbild.serve").joinpath("static/playground.html").read_text(encoding="utf-8")


_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self' 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'")


def create_app(
    pipeline: KleinPipeline | None = None,
    *,
    model: str | None = None,
    settings: ServerSettings | None = None,
    load_options: Mapping[str, Any] | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The ASGI app: serve `pipeline` (ready at once), or load `model` in the background (/health: loading)."""
    if (pipeline is None) == (model is None):
        raise ValueError("give exactly one of pipeline (already loaded) or model (to load)")
    settings = settings or ServerSettings()
    metrics = Metrics()
    for name, text in (
        ("kleinbild_http_requests_total", "HTTP requests by route, method and status"),
        ("kleinbild_http_request_seconds", "HTTP request latency (streams excluded)"),
        ("kleinbild_jobs_accepted_total", "jobs accepted into the queue"),
        ("kleinbild_jobs_rejected_total", "jobs refused at the door"),
        ("kleinbild_jobs_total", "jobs finished, by final status"),
        ("kleinbild_images_generated_total", "images produced"),
        ("kleinbild_batches_total", "batched engine calls"),
        ("kleinbild_batch_images", "images per batched engine call"),
        ("kleinbild_stage_seconds", "seconds per stage: queue, text, references, denoise, decode, preview, "
         "encode_output, total"),
    ):
        metrics.describe(name, text)
    store = OutputStore(settings.output_dir, settings.ttl)
    engine = Engine(
        EngineLimits(max_queue=settings.max_queue, max_batch=settings.max_batch, preview_every=settings.preview_every,
                     preview_px=settings.preview_px, ttl=settings.ttl),
        store, metrics,
    )
    # model_ids: the names a request may use for the served model, the one /v1/models shows first.
    state: dict[str, Any] = {"model_ids": (model or "",), "model_id": model or "", "started": time.time()}

    def ready_pipe(pipe: KleinPipeline) -> None:
        pipe.configure_caches(settings.prompt_cache, settings.reference_cache)
        mid = _model_id(pipe, settings)
        state["model_id"] = mid
        state["model_ids"] = tuple(dict.fromkeys(x for x in (mid, pipe.preset.name, pipe.source) if x))
        engine.attach(pipe)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        engine.start(loop)
        if pipeline is not None:
            ready_pipe(pipeline)
        else:
            def load() -> None:
                from kleinbild.pipeline import KleinPipeline

                try:
                    pipe = KleinPipeline.from_pretrained(model, **dict(load_options or {}))
                except BaseException as e:
                    log.error("loading %s failed: %s", model, e)
                    loop.call_soon_threadsafe(engine.fail_loading, f"loading {model} failed: {e}")
                    if on_load_failure is not None:
                        on_load_failure(e)
                    return
                loop.call_soon_threadsafe(ready_pipe, pipe)

            threading.Thread(target=load, name="kleinbild-load", daemon=True).start()

        async def purge() -> None:
            while True:
                await asyncio.sleep(max(1.0, min(60.0, settings.ttl / 4)))
                engine.purge()

        purger = asyncio.create_task(purge())
        try:
            yield
        finally:
            purger.cancel()
            engine.stop()
            await asyncio.to_thread(engine.join)
            store.close()

    app = FastAPI(title="kleinbild", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.store = store
    app.state.settings = settings

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            msg = "no such endpoint; see GET /v1/models, POST /v1/images/generations, /v1/images/edits, /v1/jobs"
        return ApiError(exc.status_code, msg, code=code).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _bad(f"{param or 'request'}: {first.get('msg', 'invalid')}", param).response()

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error", exc_info=exc)
        return ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()

    def ready_engine() -> KleinPipeline:
        if engine.status == "failed":
            raise ApiError(503, engine.load_error or "the model failed to load", code="model_failed")
        if engine.pipe is None:
            raise ApiError(503, "the model is still loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "5"})
        return engine.pipe

    async def make_job(request: Request, kind: str) -> Job:
        pipe = ready_engine()
        fields, images = await read_request(request, settings, allow_form=kind != "generation")
        if kind == "generation" and images:
            raise _bad("generations take no image; send references to /v1/images/edits (or /v1/jobs)", "image",
                       "unexpected_image")
        spec_kind = ("edit" if images else "generation") if kind == "job" else kind
        args = (fields, images, spec_kind, pipe, settings, state["model_ids"])
        spec = await asyncio.to_thread(build_spec, *args) if images else build_spec(*args)
        spec.previews = kind == "job"
        try:
            return engine.submit(Job(spec))
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", code="queue_full", type="rate_limit_error",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except NotReady as e:
            raise ApiError(503, str(e), code="not_ready", headers={"Retry-After": "5"}) from None

    async def answer(request: Request, job: Job) -> JSONResponse:
        assert job.done is not None
        while not job.done.done():
            done, _ = await asyncio.wait({job.done}, timeout=0.5)
            if not done and await request.is_disconnected():
                engine.cancel(job)  # nobody will read the answer: free the slot
                break
        # Answered here and only here: keeping it for GET /v1/jobs would hold its images for the TTL.
        engine.jobs.pop(job.id, None)
        if job.state == SUCCEEDED:
            return JSONResponse(images_response(job, _base_url(request)))
        if job.state == FAILED and job.error is not None:
            return JSONResponse(job.error.body(), status_code=job.error.status)
        return ApiError(409, "the job was cancelled", code="cancelled").response()

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        return await answer(request, await make_job(request, "generation"))

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        return await answer(request, await make_job(request, "edit"))

    @app.post("/v1/jobs", status_code=202)
    async def create_job(request: Request) -> Response:
        job = await make_job(request, "job")
        return JSONResponse(job_view(job, _base_url(request)), status_code=202,
                            headers={"Location": f"/v1/jobs/{job.id}"})

    def find_job(job_id: str) -> Job:
        job = engine.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id[:64]!r} (unknown, or expired after {settings.ttl:g} s)",
                           param="id", code="job_not_found")
        return job

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request) -> Response:
        return JSONResponse(job_view(find_job(job_id), _base_url(request)))

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str, request: Request) -> Response:
        job = find_job(job_id)
        if not engine.cancel(job):
            raise ApiError(409, f"job {job.id} already {job.state}; nothing to cancel", param="id",
                           code="job_finished")
        return JSONResponse(job_view(job, _base_url(request)))

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request) -> Response:
        job = find_job(job_id)
        base = _base_url(request)
        try:
            start = int(request.headers.get("last-event-id", "-1")) + 1
        except ValueError:
            start = 0

        async def stream() -> AsyncIterator[str]:
            i = max(0, start)
            yield "retry: 1000\n\n"
            while True:
                job.changed.clear()
                while i < len(job.events):
                    name, data = job.events[i]
                    if data is None:  # terminal: the whole job, result or error included
                        data = job_view(job, base)
                    yield f"id: {i}\nevent: {name}\ndata: {json.dumps(data)}\n\n"
                    i += 1
                if job.terminal:
                    return
                try:
                    await asyncio.wait_for(job.changed.wait(), timeout=15)
                except TimeoutError:
                    yield ": keep-alive\n\n"  # also how a gone client is noticed

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/files/{name}")
    async def get_file(name: str) -> Response:
        item = store.get(name) if re.fullmatch(r"[A-Za-z0-9_-]{8,64}\.(png|jpeg|webp)", name) else None
        if item is None:
            raise ApiError(404, "no such file (unknown id, or expired)", param="name", code="file_not_found")
        path, media, expires = item
        left = max(0, int(expires - time.time()))
        return FileResponse(path, media_type=media, headers={
            "Cache-Control": f"private, max-age={left}", "X-Content-Type-Options": "nosniff"})

    def model_card() -> dict[str, Any]:
        pipe = engine.pipe
        card: dict[str, Any] = {"id": state["model_id"], "object": "model", "created": int(state["started"]),
                                "owned_by": "kleinbild", "ready": pipe is not None}
        if pipe is not None:
            p = pipe.preset
            card["kleinbild"] = {
                "preset": p.name, "default_size": p.default_size, "default_steps": p.default_steps,
                "uses_cfg": p.uses_cfg, "default_guidance": p.default_guidance if p.uses_cfg else None,
                "size_multiple": p.ae.downscale, "min_side": MIN_SIDE,
                "limits": {"max_pixels": settings.max_pixels, "max_n": settings.max_n,
                           "max_images": settings.max_images, "max_steps": settings.max_steps,
                           "max_upload_bytes": settings.max_upload_bytes},
            }
        return card

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str) -> Response:
        if model_id not in state["model_ids"]:
            raise ApiError(404, f"model {model_id!r} is not served here", param="model", code="model_not_found")
        return JSONResponse(model_card())

    @app.get("/health")
    async def health() -> Response:
        body = {"status": engine.status, "model": state["model_id"], "queue_depth": engine.queue_depth,
                "queue_capacity": settings.max_queue, "running_images": engine.running,
                "uptime_seconds": round(time.time() - state["started"], 1), "version": __version__}
        if engine.load_error:
            body["error"] = engine.load_error
        return JSONResponse(body, status_code=200 if engine.status == "ready" else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        pipe = engine.pipe
        gauges: dict[str, tuple[str, dict[tuple, float]]] = {
            "kleinbild_model_ready": ("1 when the model is loaded", {(): 1.0 if pipe is not None else 0.0}),
            "kleinbild_queue_depth": ("jobs waiting", {(): float(engine.queue_depth)}),
            "kleinbild_queue_capacity": ("most jobs that may wait", {(): float(settings.max_queue)}),
            "kleinbild_running_images": ("images in the running batch", {(): float(engine.running)}),
            "kleinbild_jobs_stored": ("jobs kept for GET /v1/jobs/{id}", {(): float(len(engine.jobs))}),
            "kleinbild_output_files": ("url results on disk", {(): float(len(store))}),
        }
        counters: dict[str, tuple[str, dict[tuple, float]]] = {}
        if pipe is not None:
            stats = pipe.cache_stats()
            for what, help_text in (("hits", "cache hits"), ("misses", "cache misses"),
                                    ("saved_seconds", "encoder seconds that cache hits skipped")):
                counters[f"kleinbild_cache_{what}_total"] = (
                    help_text, {(("cache", c),): float(s[what]) for c, s in stats.items()})
            gauges["kleinbild_cache_entries"] = (
                "entries held per cache", {(("cache", c),): float(s["entries"]) for c, s in stats.items()})
        return PlainTextResponse(metrics.render(gauges, counters), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def playground() -> Response:
        return HTMLResponse(_playground(), headers={"Content-Security-Policy": _CSP, "X-Frame-Options": "DENY",
                                                    "Cache-Control": "no-cache"})

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)

    app.add_middleware(Guard, settings=settings)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST",
                           "DELETE"], allow_headers=["Authorization", "Content-Type", "Last-Event-ID"])
    app.add_middleware(Observe, metrics=metrics)
    return app


def api_keys_from_env() -> list[str]:
    keys = os.environ.get("KLEINBILD_API_KEYS", "") + "," + os.environ.get("KLEINBILD_API_KEY", "")
    return [k.strip() for k in keys.split(",") if k.strip()]


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, settings: ServerSettings | None = None,
          load_options: Mapping[str, Any] | None = None, log_level: str = "info") -> int:
    """Run the server until interrupted; 1 if the model failed to load."""
    import uvicorn

    failed: list[BaseException] = []
    holder: dict[str, uvicorn.Server] = {}

    def give_up(e: BaseException) -> None:
        failed.append(e)
        if "server" in holder:
            holder["server"].should_exit = True

    app = create_app(model=model, settings=settings, load_options=load_options, on_load_failure=give_up)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            server_header=False)
    server = uvicorn.Server(config)
    holder["server"] = server
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it already handled with a graceful shutdown
        pass
    return 1 if failed else 0


__all__ = ["ApiError", "ServerSettings", "api_keys_from_env", "create_app", "serve"]
