"""The HTTP endpoints: the OpenAI images API, async jobs with server-sent events, files, models, health, metrics and
the playground. Each handler reads the request, goes through `protocol` and the `Worker`, and shapes the answer."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse

from kleinbild import __version__
from kleinbild.images import MIN_SIDE
from kleinbild.serve.bfl import add_bfl_routes
from kleinbild.serve.metrics import Metrics
from kleinbild.serve.openapi import openapi_document
from kleinbild.serve.protocol import ApiError, _bad, base_url, build_job, images_response, job_view, read_request
from kleinbild.serve.settings import ServerSettings
from kleinbild.serve.store import OutputStore
from kleinbild.serve.worker import FAILED, SUCCEEDED, Job, NotReady, QueueFull, Worker

if TYPE_CHECKING:
    from kleinbild.pipeline import KleinPipeline

_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self' 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'")


class Service:
    """What the handlers share: the worker, the output store, metrics, settings and the served model's names."""

    def __init__(self, worker: Worker, store: OutputStore, metrics: Metrics, settings: ServerSettings,
                 model: str | None):
        self.worker, self.store, self.metrics, self.settings = worker, store, metrics, settings
        # The names a request may use for the served model; /v1/models shows the first.
        self.model_ids: tuple[str, ...] = (model or "",)
        self.started = time.time()

    def base(self, request: Request) -> str:
        """What url results start with: the configured public URL, else the address the client used (its Host
        header was checked against --allowed-host by the guard)."""
        return self.settings.public_url.rstrip("/") if self.settings.public_url else base_url(request)

    def attach(self, pipe: KleinPipeline) -> None:
        pipe.configure_caches(self.settings.prompt_cache, self.settings.reference_cache)
        mid = self.settings.model_id or _model_id(pipe)
        self.model_ids = tuple(dict.fromkeys(x for x in (mid, pipe.preset.name, pipe.source) if x))
        self.worker.attach(pipe)

    # -------------------------------------------------------- the images API and jobs

    def ready_pipe(self) -> KleinPipeline:
        if self.worker.status == "failed":
            raise ApiError(503, self.worker.load_error or "the model failed to load", code="model_failed")
        if self.worker.pipe is None:
            raise ApiError(503, "the model is still loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "5"})
        return self.worker.pipe

    async def make_job(self, request: Request, kind: str) -> Job:
        pipe = self.ready_pipe()
        self._room()
        body = await read_request(request, self.settings, allow_form=kind != "generation")
        if kind == "generation" and (body.images or body.mask is not None):
            param = "image" if body.images else "mask"
            raise _bad(f"generations take no {param}; send edits to /v1/images/edits (or /v1/jobs)", param,
                       f"unexpected_{param}")
        job_kind = ("edit" if body.images else "generation") if kind == "job" else kind
        args = (body, job_kind, pipe, self.settings, self.model_ids)
        job = await asyncio.to_thread(build_job, *args) if body.images else build_job(*args)
        if kind == "job":
            job.delivery = replace(job.delivery, previews=True)
        try:
            return self.worker.submit(job)
        except QueueFull as e:
            raise _busy(e) from None
        except NotReady as e:
            raise ApiError(503, str(e), code="not_ready", headers={"Retry-After": "5"}) from None

    def _room(self) -> None:
        try:
            self.worker.check_room()
        except QueueFull as e:
            raise _busy(e) from None

    async def answer(self, request: Request, job: Job) -> JSONResponse:
        assert job.done is not None
        while not job.done.done():
            done, _ = await asyncio.wait({job.done}, timeout=0.5)
            if not done and await request.is_disconnected():
                self.worker.cancel(job)  # nobody will read the answer: free the slot
                break
        # Answered here and only here: keeping it for GET /v1/jobs would hold its images for the TTL.
        self.worker.jobs.pop(job.id, None)
        if job.state == SUCCEEDED:
            return JSONResponse(images_response(job, self.base(request)))
        if job.state == FAILED and job.error is not None:
            return JSONResponse(job.error.body(), status_code=job.error.status)
        return ApiError(409, "the job was cancelled", code="cancelled").response()

    async def generations(self, request: Request) -> Response:
        return await self.answer(request, await self.make_job(request, "generation"))

    async def edits(self, request: Request) -> Response:
        return await self.answer(request, await self.make_job(request, "edit"))

    async def create_job(self, request: Request) -> Response:
        job = await self.make_job(request, "job")
        return JSONResponse(job_view(job, self.base(request)), status_code=202,
                            headers={"Location": f"/v1/jobs/{job.id}"})

    def find_job(self, job_id: str) -> Job:
        job = self.worker.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id[:64]!r} (unknown, or expired after {self.settings.ttl:g} s)",
                           param="id", code="job_not_found")
        return job

    async def get_job(self, job_id: str, request: Request) -> Response:
        return JSONResponse(job_view(self.find_job(job_id), self.base(request)))

    async def cancel_job(self, job_id: str, request: Request) -> Response:
        job = self.find_job(job_id)
        if not self.worker.cancel(job):
            raise ApiError(409, f"job {job.id} already {job.state}; nothing to cancel", param="id",
                           code="job_finished")
        return JSONResponse(job_view(job, self.base(request)))

    async def job_events(self, job_id: str, request: Request) -> Response:
        job = self.find_job(job_id)
        try:
            start = int(request.headers.get("last-event-id", "-1")) + 1
        except ValueError:
            start = 0
        return StreamingResponse(_events(job, self.base(request), max(0, start)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def get_file(self, name: str) -> Response:
        item = self.store.get(name) if re.fullmatch(r"[A-Za-z0-9_-]{8,64}\.(png|jpeg|webp)", name) else None
        if item is None:
            raise ApiError(404, "no such file (unknown id, or expired)", param="name", code="file_not_found")
        path, media, expires = item
        left = max(0, int(expires - time.time()))
        return FileResponse(path, media_type=media, headers={
            "Cache-Control": f"private, max-age={left}", "X-Content-Type-Options": "nosniff"})

    # -------------------------------------------------------- models, health, metrics, playground

    def model_card(self) -> dict[str, Any]:
        pipe = self.worker.pipe
        card: dict[str, Any] = {"id": self.model_ids[0], "object": "model", "created": int(self.started),
                                "owned_by": "kleinbild", "ready": pipe is not None}
        if pipe is not None:
            p, s = pipe.preset, self.settings
            card["kleinbild"] = {
                "preset": p.name, "default_size": p.default_size, "default_steps": p.default_steps,
                "uses_cfg": p.uses_cfg, "default_guidance": p.default_guidance if p.uses_cfg else None,
                "size_multiple": p.ae.downscale, "min_side": MIN_SIDE,
                "limits": {"max_pixels": s.max_pixels, "max_n": s.max_n, "max_images": s.max_images,
                           "max_steps": s.max_steps, "max_upload_bytes": s.max_upload_bytes},
            }
        return card

    async def models(self) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def one_model(self, model_id: str) -> Response:
        if model_id not in self.model_ids:
            raise ApiError(404, f"model {model_id!r} is not served here", param="model", code="model_not_found")
        return JSONResponse(self.model_card())

    async def health(self) -> Response:
        w = self.worker
        body = {"status": w.status, "model": self.model_ids[0], "queue_depth": w.queue_depth,
                "queue_capacity": self.settings.max_queue, "running_images": w.running,
                "uptime_seconds": round(time.time() - self.started, 1), "version": __version__}
        if w.load_error:
            body["error"] = w.load_error
        replicas = w.replica_list()
        if replicas is not None:
            body["replicas"] = replicas
        return JSONResponse(body, status_code=200 if w.status == "ready" else 503)

    async def prometheus(self) -> Response:
        return PlainTextResponse(self.metrics.render(*self._scraped()), media_type="text/plain; version=0.0.4")

    def _scraped(self) -> tuple[dict, dict]:
        """The gauges and counters read at scrape time (the rest the metrics object holds itself)."""
        w, pipe = self.worker, self.worker.pipe
        gauges: dict[str, tuple[str, dict[tuple, float]]] = {
            "kleinbild_model_ready": ("1 when the model is loaded (with replicas: one is ready)",
                                      {(): 1.0 if pipe is not None and w.status == "ready" else 0.0}),
            "kleinbild_queue_depth": ("jobs waiting", {(): float(w.queue_depth)}),
            "kleinbild_queue_capacity": ("most jobs that may wait", {(): float(self.settings.max_queue)}),
            "kleinbild_running_images": ("images in the running batch", {(): float(w.running)}),
            "kleinbild_jobs_stored": ("jobs kept for GET /v1/jobs/{id}", {(): float(len(w.jobs))}),
            "kleinbild_output_files": ("url results on disk", {(): float(len(self.store))}),
        }
        replicas = w.replica_list()
        if replicas is not None:
            states: dict[tuple, float] = {}
            for r in replicas:
                states[(("state", r["state"]),)] = states.get((("state", r["state"]),), 0.0) + 1
            gauges["kleinbild_replicas"] = ("Ray Serve replicas by state", states)
        counters: dict[str, tuple[str, dict[tuple, float]]] = {}
        if pipe is not None:
            stats = pipe.cache_stats()
            for what, help_text in (("hits", "cache hits"), ("misses", "cache misses"),
                                    ("saved_seconds", "encoder seconds that cache hits skipped")):
                counters[f"kleinbild_cache_{what}_total"] = (
                    help_text, {(("cache", c),): float(s[what]) for c, s in stats.items()})
            gauges["kleinbild_cache_entries"] = (
                "entries held per cache", {(("cache", c),): float(s["entries"]) for c, s in stats.items()})
            compiled = getattr(pipe, "compilations", {})  # a replica front has none
            if compiled:
                counters["kleinbild_compilations_total"] = (
                    "torch.compile graphs compiled, per module",
                    {(("module", m),): float(n) for m, n in compiled.items()})
        return gauges, counters

    async def playground(self) -> Response:
        html = resources.files("kleinbild.serve").joinpath("static/playground.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": _CSP, "X-Frame-Options": "DENY",
                                           "Cache-Control": "no-cache"})

    async def favicon(self) -> Response:
        return Response(status_code=204)

    async def openapi(self) -> Response:
        return JSONResponse(openapi_document())


def add_routes(app: FastAPI, s: Service) -> None:
    for path, handler, methods, status in (
        ("/v1/images/generations", s.generations, ["POST"], 200),
        ("/v1/images/edits", s.edits, ["POST"], 200),
        ("/v1/jobs", s.create_job, ["POST"], 202),
        ("/v1/jobs/{job_id}", s.get_job, ["GET"], 200),
        ("/v1/jobs/{job_id}", s.cancel_job, ["DELETE"], 200),
        ("/v1/jobs/{job_id}/events", s.job_events, ["GET"], 200),
        ("/v1/files/{name}", s.get_file, ["GET"], 200),
        ("/v1/models", s.models, ["GET"], 200),
        ("/v1/models/{model_id:path}", s.one_model, ["GET"], 200),
        ("/health", s.health, ["GET"], 200),
        ("/metrics", s.prometheus, ["GET"], 200),
        ("/", s.playground, ["GET"], 200),
        ("/favicon.ico", s.favicon, ["GET"], 200),
        ("/openapi.json", s.openapi, ["GET"], 200),
    ):
        app.add_api_route(path, handler, methods=methods, status_code=status)
    add_bfl_routes(app, s)  # BFL's API (api.bfl.ai) as a local drop-in


async def _events(job: Job, base: str, start: int) -> AsyncIterator[str]:
    """Server-sent events from `start` on: the history first, then each new event; the terminal one carries the
    whole job (result or error)."""
    i = start
    yield "retry: 1000\n\n"
    while True:
        job.changed.clear()
        while i < len(job.events):
            name, data = job.events[i]
            if data is None:
                data = job_view(job, base)
            yield f"id: {i}\nevent: {name}\ndata: {json.dumps(data)}\n\n"
            i += 1
        if job.terminal:
            return
        try:
            await asyncio.wait_for(job.changed.wait(), timeout=15)
        except TimeoutError:
            yield ": keep-alive\n\n"  # also how a gone client is noticed


def _busy(e: QueueFull) -> ApiError:
    return ApiError(429, f"the server is busy: {e}", code="queue_full", type="rate_limit_error",
                    headers={"Retry-After": str(e.retry_after)})


def _model_id(pipe: KleinPipeline) -> str:
    src = pipe.source
    if src and Path(src).expanduser().exists():
        return Path(src).name  # a local folder or file: its name, never the whole path
    return src or pipe.preset.name
