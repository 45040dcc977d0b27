"""The app factory: the worker, the output store and metrics, wired to the routes and middleware, and `serve()`.

Request flow: parse and validate on the event loop (image decoding in a thread) into the engine's `Request`,
submit a `Job` to the `Worker` (bounded queue, one thread owning the pipeline), then either wait for it (the
images endpoints) or hand back its id (`/v1/jobs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kleinbild import __version__
from kleinbild.serve.metrics import Metrics
from kleinbild.serve.middleware import Guard, Observe
from kleinbild.serve.protocol import ApiError, _bad
from kleinbild.serve.routes import Service, add_routes
from kleinbild.serve.settings import ReplicaOptions, ServerSettings
from kleinbild.serve.store import OutputStore
from kleinbild.serve.worker import Worker, WorkerLimits

if TYPE_CHECKING:
    from kleinbild.loading import LoadOptions
    from kleinbild.pipeline import KleinPipeline

log = logging.getLogger(__name__)

_METRICS = (
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
)


def create_app(
    pipeline: KleinPipeline | None = None,
    *,
    model: str | None = None,
    settings: ServerSettings | None = None,
    load_options: LoadOptions | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
    replicas: ReplicaOptions | None = None,
) -> FastAPI:
    """The ASGI app: serve `pipeline` (ready at once), or load `model` in the background (/health: loading), in
    this process or, with `replicas`, on Ray Serve replicas (`serve.replicas`)."""
    if (pipeline is None) == (model is None):
        raise ValueError("give exactly one of pipeline (already loaded) or model (to load)")
    if replicas is not None and model is None:
        raise ValueError("replicas load the model themselves: give model (a name or path), not a pipeline")
    settings = settings or ServerSettings()
    metrics = Metrics()
    for name, text in _METRICS:
        metrics.describe(name, text)
    store = OutputStore(settings.output_dir, settings.ttl)
    limits = WorkerLimits(max_queue=settings.max_queue, max_batch=settings.max_batch,
                          preview_every=settings.preview_every, preview_px=settings.preview_px, ttl=settings.ttl)
    if replicas is None:
        worker = Worker(limits, store, metrics)
    else:
        from kleinbild.serve.replicas import ReplicaWorker

        worker = ReplicaWorker(limits, store, metrics, replicas.max_retries)
    service = Service(worker, store, metrics, settings, model)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        worker.start(loop)
        cluster = None
        if pipeline is not None:
            service.attach(pipeline)
        elif replicas is not None:
            assert model is not None
            cluster = _deploy_replicas(service, loop, model, load_options, replicas, on_load_failure)
        else:
            assert model is not None
            _load_in_background(service, loop, model, load_options, on_load_failure)
        purger = asyncio.create_task(_purge_every(worker, max(1.0, min(60.0, settings.ttl / 4))))
        try:
            yield
        finally:
            purger.cancel()
            worker.stop()
            await asyncio.to_thread(worker.join)
            if cluster is not None:
                await asyncio.to_thread(cluster.stop)
            store.close()

    app = FastAPI(title="kleinbild", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker, app.state.metrics, app.state.store, app.state.settings = worker, metrics, store, settings
    _add_error_handlers(app)
    add_routes(app, service)
    app.add_middleware(Guard, settings=settings)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST",
                           "DELETE"], allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "x-key"])
    app.add_middleware(Observe, metrics=metrics)
    return app


def _load_in_background(service: Service, loop: asyncio.AbstractEventLoop, model: str,
                        options: LoadOptions | None, on_failure: Callable[[BaseException], None] | None) -> None:
    def load() -> None:
        from kleinbild.pipeline import KleinPipeline

        try:
            pipe = KleinPipeline.from_pretrained(model, options)
        except BaseException as e:
            log.error("loading %s failed: %s", model, e)
            loop.call_soon_threadsafe(service.worker.fail_loading, f"loading {model} failed: {e}")
            if on_failure is not None:
                on_failure(e)
            return
        loop.call_soon_threadsafe(service.attach, pipe)

    threading.Thread(target=load, name="kleinbild-load", daemon=True).start()


def _deploy_replicas(service: Service, loop: asyncio.AbstractEventLoop, model: str, options: LoadOptions | None,
                     replicas: ReplicaOptions, on_failure: Callable[[BaseException], None] | None) -> Any:
    """The front validates with the model's preset (its files are located, not loaded); the replicas load it."""
    from kleinbild.loading import LoadOptions, locate_with
    from kleinbild.serve.replicas import Cluster, FrontModel

    options = options or LoadOptions()
    service.attach(FrontModel(locate_with(model, options).preset, model))  # type: ignore[arg-type]
    cluster = Cluster(replicas)
    cluster.start(service.worker, loop, model, options, service.settings, on_failure)  # type: ignore[arg-type]
    return cluster


async def _purge_every(worker: Worker, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        worker.purge()


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

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


def api_keys_from_env() -> list[str]:
    keys = os.environ.get("KLEINBILD_API_KEYS", "") + "," + os.environ.get("KLEINBILD_API_KEY", "")
    return [k.strip() for k in keys.split(",") if k.strip()]


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, settings: ServerSettings | None = None,
          load_options: LoadOptions | None = None, log_level: str = "info",
          replicas: ReplicaOptions | None = None) -> int:
    """Run the server until interrupted; 1 if the model failed to load.

    What can fail at once fails before anything starts, as one error: a model that is not there (its files are
    located, not loaded) and an address that cannot be bound. The weights then load in the background."""
    import uvicorn

    from kleinbild.loading import LoadOptions, locate_with

    locate_with(model, load_options or LoadOptions())
    sock = _listen(host, port)
    failed: list[BaseException] = []
    holder: dict[str, uvicorn.Server] = {}

    def give_up(e: BaseException) -> None:
        failed.append(e)
        if "server" in holder:
            holder["server"].should_exit = True

    app = create_app(model=model, settings=settings, load_options=load_options, on_load_failure=give_up,
                     replicas=replicas)
    keep_alive = (settings or ServerSettings()).keep_alive_timeout
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            server_header=False, timeout_keep_alive=max(1, round(keep_alive)))
    server = graceful_server(config, app)
    holder["server"] = server
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it already handled with a graceful shutdown
        pass
    finally:
        sock.close()
    return 1 if failed else 0


def graceful_server(config: Any, app: FastAPI) -> Any:
    """A uvicorn server that, on SIGTERM or Ctrl+C, first stops the worker, so every queued or running job is
    answered (503 `shutdown`, as JSON) and every event stream gets its terminal event while the connections are
    still open; only then does uvicorn drain them and exit. Plain uvicorn would cancel the requests first."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            for server in self.servers:  # stop accepting first: nothing new arrives while jobs are answered
                server.close()
            app.state.worker.stop()
            await asyncio.sleep(0.2)  # the answers and terminal events go out
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # As uvicorn's, without raising SIGTERM again after the graceful exit: stopped on request, the
            # process exits 0 (Ctrl+C still ends in KeyboardInterrupt, which serve() takes as a normal stop).
            with super().capture_signals():
                yield
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    return GracefulServer(config)


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it), or an OSError that says which address failed."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, OverflowError) as e:
        raise OSError(f"cannot listen on {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


__all__ = ["ServerSettings", "api_keys_from_env", "create_app", "serve"]
