"""A local drop-in for Black Forest Labs' hosted API (api.bfl.ai): code written against it runs here by changing
the base URL. `POST /v1/flux-2-klein-4b` (and its klein siblings) queues a job on the one loaded model,
`GET /v1/get_result?id=` polls it, and a `webhook_url` on a host the operator allowed (`--webhook-host`) gets the
same payload, signed, when the job ends.

Requests go through the engine's one validation and the shared `Worker` queue (same limits, 429s and metrics as
the OpenAI endpoints); answers and errors take BFL's shapes (`{"detail": ...}`, as its FastAPI server answers)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import SplitResult, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kleinbild import __version__
from kleinbild.images import InputError
from kleinbild.request import MAX_SEED
from kleinbild.serve.protocol import ApiError, Fields, _bad, _decode_image_string, _kind, decode_image
from kleinbild.serve.settings import ServerSettings
from kleinbild.serve.store import MEDIA_TYPES
from kleinbild.serve.worker import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Delivery,
    Job,
    NotReady,
    QueueFull,
    Worker,
)

if TYPE_CHECKING:
    from kleinbild.pipeline import KleinPipeline

log = logging.getLogger(__name__)

# The klein endpoints BFL's API reference lists; all run the one model this server loaded.
ENDPOINTS = ("flux-2-klein-4b", "flux-2-klein-9b", "flux-2-klein-9b-preview")
ROUTES = frozenset({"/v1/get_result", *(f"/v1/{name}" for name in ENDPOINTS)})
IMAGE_FIELDS = ("input_image", "input_image_2", "input_image_3", "input_image_4")
FIELDS = frozenset({"prompt", *IMAGE_FIELDS, "seed", "width", "height", "output_format", "safety_tolerance",
                    "prompt_upsampling", "webhook_url", "webhook_secret"})
OUTPUT_FORMATS = ("jpeg", "png", "webp")
SIGNATURE_HEADER = "X-BFL-Signature"
WEBHOOK_TIMEOUT = 10.0  # seconds; a slow receiver must not hold a thread for long
_JPEG_QUALITY = 95
_LOOP_PARSE_BYTES = 64 * 1024
_STATUS = {QUEUED: "Pending", RUNNING: "Pending", SUCCEEDED: "Ready", FAILED: "Error", CANCELLED: "Error"}
_ENGINE_PARAMS = {"images": "input_image"}


class Service(Protocol):
    """What the BFL endpoints need of the server (routes.Service; not imported, routes imports this module)."""

    worker: Worker
    settings: ServerSettings
    model_ids: tuple[str, ...]

    def base(self, request: Request) -> str: ...

    def ready_pipe(self) -> KleinPipeline: ...


@dataclass(frozen=True)
class Webhook:
    url: str
    secret: str | None


# ---------------------------------------------------------------- requests


async def read_body(request: Request) -> dict[str, Any]:
    """The JSON object of a submit, with no field BFL's klein endpoints do not take."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not (ctype.startswith("application/") and ctype.endswith("+json")):
        raise ApiError(415, f"Content-Type {ctype!r} is not accepted here; send application/json",
                       code="unsupported_media_type")
    raw = await request.body()
    try:
        # A big body (base64 images) is parsed off the event loop, which must keep answering /health.
        body = json.loads(raw) if len(raw) < _LOOP_PARSE_BYTES else await asyncio.to_thread(json.loads, raw)
    except ValueError as e:
        raise _bad(f"the body is not valid JSON ({str(e)[:200]})", None, "invalid_json") from None
    except RecursionError:
        raise _bad("the body's JSON is nested too deeply", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad(f"the body must be a JSON object, got {_kind(body)}", None, "invalid_json")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ApiError(422, f"unknown field {unknown[0][:64]!r}; these endpoints take: {', '.join(sorted(FIELDS))}",
                       param=unknown[0][:64], code="extra_forbidden")
    return body


def webhook_of(fields: Fields, settings: ServerSettings) -> Webhook | None:
    """The webhook to call when the job ends, only to a host the operator listed: a server must not be made to
    call arbitrary URLs (inside its network, say) on a client's word."""
    url = fields.text("webhook_url", max_len=2048)
    secret = fields.text("webhook_secret", max_len=1024)
    if url is None:
        return None
    if not settings.webhook_hosts:
        raise _bad("webhooks are off on this server: it calls no URL unless its operator allows the host with "
                   "--webhook-host", "webhook_url", "webhook_not_allowed")
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad("webhook_url must be an http:// or https:// URL", "webhook_url", "invalid_webhook_url")
    if parts.username is not None or parts.password is not None:
        raise _bad("webhook_url must not carry credentials", "webhook_url", "invalid_webhook_url")
    if not _host_allowed(parts, settings.webhook_hosts):
        raise _bad(f"webhook_url's host {parts.hostname[:100]!r} is not allowed; this server calls only "
                   f"{', '.join(settings.webhook_hosts)} (--webhook-host)", "webhook_url", "webhook_not_allowed")
    return Webhook(url.strip(), secret or None)


def _host_allowed(parts: SplitResult, hosts: tuple[str, ...]) -> bool:
    name = parts.hostname or ""
    shown = f"[{name}]" if ":" in name else name  # IPv6, as it is written in a URL
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return bool({name, shown, f"{shown}:{port}"} & {h.strip().lower() for h in hosts})


def build_job(body: dict[str, Any], pipe: KleinPipeline, settings: ServerSettings, endpoint: str,
              model_id: str) -> Job:
    """Validate a submit before it is queued (HTTP's fields here, the rest by the engine's `pipe.request`)."""
    fields = Fields(body, from_form=False)
    prompt = fields.text("prompt", max_len=settings.max_prompt_chars)
    if prompt is None:
        raise ApiError(422, "prompt is required", param="prompt", code="missing")
    if not prompt.strip():
        raise _bad("prompt must not be empty", "prompt", "invalid_value")
    delivery = _delivery(fields, endpoint, model_id, pipe.preset.ae.downscale)
    images = _references(body, settings)
    args = dict(width=_side(fields, "width"), height=_side(fields, "height"), seed=fields.integer("seed", 0, MAX_SEED),
                num_images=1, max_pixels=settings.max_pixels)
    try:
        request = pipe.request(prompt, images, **args)
    except InputError as e:
        raise _bad(str(e), _ENGINE_PARAMS.get(e.param or "", e.param)) from None
    except Exception as e:  # an odd mode or a codec error on conversion: still the image's fault
        raise _bad(f"cannot use the image: {type(e).__name__}: {e}", "input_image", "invalid_image") from None
    return Job(request, replace(delivery, kind="edit") if images else delivery)


def _delivery(fields: Fields, endpoint: str, model_id: str, downscale: int) -> Delivery:
    fmt = fields.choice("output_format", OUTPUT_FORMATS, "jpeg")
    notes = [f"{endpoint} is served by this server's one model, {model_id}"]
    if fields.integer("safety_tolerance", 0, 6) is not None:
        notes.append("safety_tolerance is accepted but not applied: this server moderates nothing")
    if fields.flag("prompt_upsampling"):
        notes.append("prompt_upsampling is accepted but not applied: the prompt is used as given")
    return Delivery("url", fmt, _JPEG_QUALITY, "generation", tuple(notes), downscale=downscale)


def _side(fields: Fields, name: str) -> int | None:
    # BFL documents 0 as the default; 0 or none here: the engine's default (the first input image's size, fitted,
    # else the model's).
    return fields.integer(name, 0, 1 << 16) or None


def _references(body: dict[str, Any], settings: ServerSettings) -> list[Any]:
    given = [(name, body[name]) for name in IMAGE_FIELDS if body.get(name) not in (None, "")]
    if len(given) > settings.max_images:
        raise _bad(f"too many images: at most {settings.max_images} references per request", given[-1][0],
                   "too_many_images")
    images = []
    for name, value in given:
        if not isinstance(value, str):
            raise _bad(f"{name} must be a base64 string or a data URI, got {_kind(value)}", name, "invalid_type")
        data = _decode_image_string(value, name)
        try:
            images.append(decode_image(data, len(images), settings))
        except ApiError as e:  # its message counts images from 0; say which field it was
            raise ApiError(e.status, f"{name}: {e.message}", param=name, code=e.code) from None
    return images


# ---------------------------------------------------------------- answers


def result_view(job: Job | None, job_id: str, base: str, model_id: str) -> dict[str, Any]:
    """What `GET /v1/get_result` answers (and a webhook carries), in BFL's words."""
    if job is None:
        return {"id": job_id[:200], "status": "Task not found", "result": None, "progress": None, "details": None,
                "preview": None}
    view: dict[str, Any] = {"id": job.id, "status": _STATUS[job.state], "result": None,
                            "progress": _progress(job), "details": None, "preview": None}
    if job.state == SUCCEEDED:
        view["result"] = _ready(job, base, model_id)
    elif job.state in (FAILED, CANCELLED):
        err = job.error
        view["details"] = {"error": err.code if err else "cancelled",
                           "message": err.message if err else "the job was cancelled"}
    return view


def _progress(job: Job) -> float:
    if job.state == SUCCEEDED:
        return 1.0
    total = job.total or job.request.steps
    # Below 1 until Ready: after the last step the image is still decoded and encoded.
    return round(min(0.99, job.step / total), 4) if total else 0.0


def _ready(job: Job, base: str, model_id: str) -> dict[str, Any]:
    out, req, st = job.outputs[0], job.request, job.settings
    if out.file_id is not None:
        sample = f"{base}/v1/files/{out.file_id}"
    else:  # a job from /v1/jobs that asked for b64_json
        fmt = job.delivery.output_format
        sample = f"data:{MEDIA_TYPES[fmt]};base64,{base64.b64encode(out.data).decode()}"
    return {
        "sample": sample, "seed": out.seed, "prompt": req.prompt, "model": model_id,
        "kleinbild": {"job": job.id, "preset": st.get("model"), "width": req.width, "height": req.height,
                      "steps": req.steps, "guidance": req.guidance, "output_format": job.delivery.output_format,
                      "references": len(job.reference_sizes), "seconds": st.get("seconds"),
                      "notes": st.get("notes", [])},
    }


def submit_view(job: Job, base: str) -> dict[str, Any]:
    req = job.request
    return {"id": job.id, "polling_url": f"{base}/v1/get_result?id={job.id}", "cost": 0.0,
            "input_mp": round(sum(w * h for w, h in job.reference_sizes) / 1e6, 4),
            "output_mp": round(req.width * req.height / 1e6, 4)}


def error_response(e: ApiError) -> JSONResponse:
    """BFL's server is FastAPI: schema errors are 422 with a list of {loc, msg, type}, the rest {"detail": text}."""
    if e.status == 422:
        where = "query" if e.param == "id" else "body"
        detail: Any = [{"loc": [where, e.param] if e.param else [where], "msg": e.message, "type": e.code}]
    else:
        detail = e.message
    return JSONResponse({"detail": detail}, status_code=e.status, headers=e.headers)


# ---------------------------------------------------------------- webhooks


def sign(body: bytes, secret: str) -> str:
    """`X-BFL-Signature`'s value: HMAC-SHA256 of the raw body with the secret, hex, after `sha256=`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect would lead the server to a host nobody allowed


# Direct connections (no proxy from the environment) and no redirects: only the allowed host is ever called.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def send_webhook(hook: Webhook, body: bytes, timeout: float = WEBHOOK_TIMEOUT) -> int | None:
    """POST `body` to the webhook (blocking; run it in a thread): its HTTP status, or None when it was not
    reached. Failures are logged, never raised: the job's result stays available to polling."""
    headers = {"Content-Type": "application/json", "User-Agent": f"kleinbild/{__version__}"}
    if hook.secret:
        headers[SIGNATURE_HEADER] = sign(body, hook.secret)
    req = urllib.request.Request(hook.url, data=body, headers=headers, method="POST")
    host = urlsplit(hook.url).netloc
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        log.warning("webhook to %s answered %s", host, e.code)
        return e.code
    except Exception as e:  # refused, timed out, bad TLS...: the receiver's problem, not the server's
        log.warning("webhook to %s failed: %s", host, e)
        return None


# ---------------------------------------------------------------- endpoints


class BflApi:
    def __init__(self, service: Service):
        self.s = service
        self._hooks: set[asyncio.Task] = set()  # kept so the pending deliveries are not garbage-collected

    async def submit(self, request: Request, endpoint: str) -> Response:
        try:
            job, hook = await self._make_job(request, endpoint)
        except ApiError as e:
            return error_response(e)
        base = self.s.base(request)
        if hook is not None:
            task = asyncio.get_running_loop().create_task(self._deliver(job, hook, base))
            self._hooks.add(task)
            task.add_done_callback(self._hooks.discard)
        return JSONResponse(submit_view(job, base))

    async def _make_job(self, request: Request, endpoint: str) -> tuple[Job, Webhook | None]:
        pipe = self.s.ready_pipe()
        worker, settings = self.s.worker, self.s.settings
        try:
            worker.check_room()  # before any image is decoded for nothing
            body = await read_body(request)
            hook = webhook_of(Fields(body, from_form=False), settings)
            args = (body, pipe, settings, endpoint, self.s.model_ids[0])
            has_images = any(body.get(k) for k in IMAGE_FIELDS)
            job = await asyncio.to_thread(build_job, *args) if has_images else build_job(*args)
            return worker.submit(job), hook
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except NotReady as e:
            raise ApiError(503, str(e), code="not_ready", headers={"Retry-After": "5"}) from None

    async def get_result(self, request: Request) -> Response:
        job_id = request.query_params.get("id")
        if job_id is None:
            return error_response(ApiError(422, "id is required", param="id", code="missing"))
        view = result_view(self.s.worker.jobs.get(job_id), job_id, self.s.base(request), self.s.model_ids[0])
        return JSONResponse(view)

    async def _deliver(self, job: Job, hook: Webhook, base: str) -> None:
        assert job.done is not None
        await job.done
        body = json.dumps(result_view(job, job.id, base, self.s.model_ids[0])).encode()
        try:
            await asyncio.to_thread(send_webhook, hook, body)
        except RuntimeError as e:  # the executor is gone: the server is shutting down
            log.warning("webhook for %s not sent: %s", job.id, e)

    def submit_handler(self, endpoint: str) -> Callable[[Request], Awaitable[Response]]:
        async def submit(request: Request) -> Response:
            return await self.submit(request, endpoint)

        return submit


def add_bfl_routes(app: FastAPI, service: Service) -> BflApi:
    api = BflApi(service)
    for name in ENDPOINTS:
        app.add_api_route(f"/v1/{name}", api.submit_handler(name), methods=["POST"])
    app.add_api_route("/v1/get_result", api.get_result, methods=["GET"])
    return api
