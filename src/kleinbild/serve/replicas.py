"""Serving on Ray Serve replicas: the front's side. `kleinbild serve --replicas N` keeps the one HTTP front (the
same routes, validation, bounded queue, jobs, SSE, metrics and keys) and hands each accepted job to a Ray Serve
deployment whose replicas each load the model once and batch their own queue (`serve.replica`).

The job table lives in the front process: a job accepted here is answered here, once. When the replica running a
job dies (process killed, node lost), the front runs it again on another replica, up to `max_retries` times, with
a `retry` event on its stream; a job that fails for its own reasons (bad input found late, an engine error) is
not retried. Restarting the front loses its queued and running jobs and their results (see docs/scale-out.md).

Ray is imported here only, and this module only with `--replicas`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kleinbild.serve.replica import NAMESPACE, KleinbildReplica, Registry
from kleinbild.serve.settings import ReplicaOptions, ServerSettings
from kleinbild.serve.worker import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
    JobError,
    NotReady,
    Output,
    QueueFull,
    Worker,
    WorkerLimits,
)

if TYPE_CHECKING:
    from kleinbild.config import ModelPreset
    from kleinbild.loading import LoadOptions
    from kleinbild.request import Request
    from kleinbild.serve.metrics import Metrics
    from kleinbild.serve.store import OutputStore

log = logging.getLogger(__name__)

APP_NAME = "kleinbild"
STALE_SECONDS = 3.0  # a replica not heard from for this long is shown as unreachable
FORGET_SECONDS = 120.0  # and then dropped from /health
_BACKOFF = (0.2, 0.5, 1.0, 2.0, 4.0)


@dataclass
class FrontModel:
    """What the front needs of the model: its preset, to validate requests. The weights live in the replicas."""

    preset: ModelPreset
    source: str | None

    def request(self, prompt: str, images: Any = None, **kwargs: Any) -> Request:
        from kleinbild.request import validate

        return validate(self.preset, prompt, images, **kwargs)

    def configure_caches(self, prompts: int, references: int) -> None:
        pass  # the caches are the replicas'

    def cache_stats(self) -> dict[str, dict[str, float]]:
        return {}


class ReplicaWorker(Worker):
    """A `Worker` whose jobs run on Ray Serve replicas: the same job table, queue bound and events."""

    def __init__(self, limits: WorkerLimits, store: OutputStore, metrics: Metrics, max_retries: int):
        super().__init__(limits, store, metrics)
        self.max_retries = max_retries
        self.handle: Any = None
        self.registry: Any = None
        self.replicas: list[dict[str, Any]] = []
        self._streams: dict[str, Any] = {}
        self._tasks: set[asyncio.Task] = set()
        self._status = "loading"

    # `status` is "ready" while at least one replica is.
    @property  # type: ignore[override]
    def status(self) -> str:
        if self._status == "ready" and not any(r["state"] == "ready" for r in self.replicas):
            return "loading"
        return self._status

    @status.setter
    def status(self, value: str) -> None:
        self._status = value

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._spawn(self._watch())

    def deployed(self, handle: Any, registry: Any) -> None:
        self.handle, self.registry = handle, registry

    def _spawn(self, coro: Any) -> asyncio.Task:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def submit(self, job: Job) -> Job:
        if self.status != "ready" or self.handle is None:
            raise NotReady(self.load_error or "no replica is ready yet")
        if self._stopping:
            raise NotReady("the server is shutting down")
        if len(self._pending) >= self.limits.max_queue:
            self.metrics.inc("kleinbild_jobs_rejected_total", reason="queue_full")
            raise QueueFull(self.retry_after())
        assert self._loop is not None
        job.done = self._loop.create_future()
        job.enqueued_at = time.perf_counter()
        self._pending.append(job)
        self.jobs[job.id] = job
        self.metrics.inc("kleinbild_jobs_accepted_total")
        self._event(job, QUEUED, {"status": QUEUED, "position": len(self._pending)})
        self._spawn(self._drive(job))
        return job

    def cancel(self, job: Job) -> bool:
        if job.terminal:
            return False
        self._leave(job)
        job.cancel.set()
        stream = self._streams.pop(job.id, None)
        if stream is not None:
            stream.cancel()  # the replica's call gets CancelledError: it stops after the current step
        self._finish(job, CANCELLED, None)
        return True

    def stop(self) -> None:
        self._stopping = True
        for job in [j for j in self.jobs.values() if not j.terminal]:
            stream = self._streams.pop(job.id, None)
            if stream is not None:
                stream.cancel()
            self._leave(job)
            self._finish(job, FAILED, JobError(503, "the server is shutting down; the job did not finish",
                                               code="shutdown"))
        for task in list(self._tasks):
            task.cancel()

    def join(self, timeout: float = 30.0) -> None:
        self._encoder.shutdown(wait=True)

    def _leave(self, job: Job) -> None:
        if job in self._pending:
            self._pending.remove(job)
        if job in self._running:
            self._running.remove(job)

    # -------------------------------------------------------- one job, on whichever replica Serve picks

    async def _drive(self, job: Job) -> None:
        from ray.exceptions import RayError, RayTaskError, TaskCancelledError

        attempt = 0
        while not job.terminal:
            stream = self.handle.options(stream=True).run.remote(job.request, job.delivery, job.id)
            self._streams[job.id] = stream
            try:
                again = await self._consume(job, stream)
            except TaskCancelledError as e:
                if job.terminal:  # we cancelled it (a DELETE, a gone client, shutdown): answered already
                    return
                again = f"the replica's call was cancelled ({type(e).__name__}), e.g. the replica was scaled down"
            except RayTaskError as e:  # the call itself raised: the job's own failure, not the replica's
                log.exception("job %s failed on a replica", job.id)
                self._fail(job, JobError(500, f"the replica failed the job: {e.cause or e}"[:2000],
                                         code="engine_error"))
                return
            except RayError as e:  # the replica died or became unreachable
                again = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            finally:
                self._streams.pop(job.id, None)
            if not again or job.terminal:
                return
            attempt += 1
            if attempt > self.max_retries:
                self._fail(job, JobError(503, f"the job's replica was lost {attempt} times ({again}); giving up",
                                         code="replica_lost"))
                return
            log.warning("job %s: %s; running it again (retry %d of %d)", job.id, again, attempt, self.max_retries)
            self._requeue(job, attempt, again)
            await asyncio.sleep(_BACKOFF[min(attempt - 1, len(_BACKOFF) - 1)])

    async def _consume(self, job: Job, stream: Any) -> str | None:
        """Apply a replica's events to the job; a reason to run it again elsewhere, or None when it ended."""
        async for name, data in stream:
            if job.terminal:
                return None
            if name == RUNNING:
                self._leave(job)
                self._running.append(job)
                if job.state != RUNNING:
                    job.state, job.started, job.batch_size = RUNNING, time.time(), int(data.get("batch_size", 1))
                    self._event(job, RUNNING, {"status": RUNNING, "batch_size": job.batch_size,
                                               "replica": data.get("replica")})
            elif name == "progress":
                self._progress(job, int(data["step"]), int(data["total"]), data.get("preview"))
            elif name == SUCCEEDED:
                self._succeeded(job, data)
                return None
            elif name == FAILED:
                if data.get("retry"):
                    return data["error"]["message"]
                self._fail(job, JobError(**data["error"]))
                return None
            elif name == CANCELLED:
                self._leave(job)
                self._finish(job, CANCELLED, None)
                return None
        return None if job.terminal else "the replica's stream ended without a result"

    def _succeeded(self, job: Job, data: dict[str, Any]) -> None:
        outputs = []
        for blob, seed in data["outputs"]:
            out = Output(blob, seed)
            if job.delivery.response_format == "url":
                out.file_id, out.data = self.store.put(blob, job.delivery.output_format), b""
            outputs.append(out)
        self._leave(job)
        self._finish(job, SUCCEEDED, None, outputs, data["settings"])

    def _fail(self, job: Job, error: JobError) -> None:
        self._leave(job)
        self._finish(job, FAILED, error)

    def _requeue(self, job: Job, attempt: int, reason: str) -> None:
        self._leave(job)
        self._pending.append(job)
        job.state, job.step = QUEUED, 0
        self._event(job, "retry", {"attempt": attempt, "max_retries": self.max_retries, "reason": reason})
        self.metrics.inc("kleinbild_job_retries_total")

    # -------------------------------------------------------- the replica list

    async def _watch(self) -> None:
        while True:
            if self.registry is not None:
                try:
                    self.replicas = _replica_view(await self.registry.snapshot.remote())
                except Exception as e:  # the registry is gone: the cluster is going down
                    log.warning("cannot read the replica registry: %s", e)
            await asyncio.sleep(0.5)

    def replica_list(self) -> list[dict[str, Any]] | None:
        return self.replicas


def _replica_view(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    now = time.time()
    out = []
    for r in sorted(reports, key=lambda r: r["id"]):
        age = now - r["seen"]
        if age > FORGET_SECONDS:
            continue
        state = r["state"] if age <= STALE_SECONDS else "unreachable"
        out.append({"id": r["id"], "pid": r["pid"], "node": r["node"], "state": state,
                    "running_images": r["running_images"], "queue_depth": r["queue_depth"], "jobs": r["jobs"],
                    "steps": r["steps"], "cancelled": r["cancelled"], "seen_seconds_ago": round(age, 1)})
    return out


# ---------------------------------------------------------------- Ray and the deployment


class Cluster:
    """Ray (joined or started here), the registry actor and the Serve application; `close` undoes what it did."""

    def __init__(self, options: ReplicaOptions):
        self.options = options
        self.started_ray = False
        self.registry_name = f"kleinbild-registry-{uuid.uuid4().hex[:12]}"
        self.registry: Any = None
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def connect(self) -> None:
        # Ray's C++ failure handler would pass the server's SIGTERM on a second time, and uvicorn takes a second
        # signal as "exit now", skipping the graceful shutdown that answers every job and stops the replicas.
        # (Read when ray is first imported.)
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        import ray
        from ray import serve

        o = self.options
        if not ray.is_initialized():
            if o.ray_address:
                ray.init(address=o.ray_address, namespace=NAMESPACE, log_to_driver=o.log_to_driver)
            else:
                ray.init(num_cpus=o.num_cpus, num_gpus=o.num_gpus, include_dashboard=False, namespace=NAMESPACE,
                         log_to_driver=o.log_to_driver)
                self.started_ray = True
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
        self.registry = ray.remote(num_cpus=0)(Registry).options(name=self.registry_name).remote()

    def deploy(self, model: str, load: LoadOptions, settings: ServerSettings) -> Any:
        """Start the replicas (blocking until Serve has them running); the deployment's handle."""
        from ray import serve

        o = self.options
        ongoing = max(2, 2 * settings.max_batch)  # room for the replica to batch its own queue
        limits = WorkerLimits(max_queue=ongoing, max_batch=settings.max_batch, preview_every=settings.preview_every,
                              preview_px=settings.preview_px, ttl=settings.ttl)
        actor = {"num_cpus": o.cpus_per_replica, "num_gpus": o.gpus_per_replica}
        scale: dict[str, Any] = {"num_replicas": o.replicas}
        if o.max_replicas is not None:
            scale = {"autoscaling_config": {"min_replicas": o.min_replicas or 1, "max_replicas": o.max_replicas,
                                            "initial_replicas": o.replicas or o.min_replicas or 1,
                                            "target_ongoing_requests": o.target_ongoing}}
        deployment = serve.deployment(name="KleinbildReplica", max_ongoing_requests=ongoing,
                                      ray_actor_options=actor, health_check_period_s=2.0,
                                      health_check_timeout_s=30.0, graceful_shutdown_timeout_s=5.0,
                                      **scale)(KleinbildReplica)
        threads = max(1, int(o.cpus_per_replica)) if not o.gpus_per_replica else None
        app = deployment.bind(model, load, limits, (settings.prompt_cache, settings.reference_cache),
                              self.registry_name, threads)
        return serve.run(app, name=APP_NAME, route_prefix=None)

    def close(self) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        try:
            serve.delete(APP_NAME)  # its replicas stop; a joined cluster keeps running
            if self.registry is not None:
                ray.kill(self.registry)
        finally:
            if self.started_ray:  # Serve's controller goes with the local Ray
                ray.shutdown()


    def start(self, worker: ReplicaWorker, loop: asyncio.AbstractEventLoop, model: str, load: LoadOptions,
              settings: ServerSettings, on_failure: Any = None) -> None:
        """Connect and deploy off the event loop (loading takes minutes on real weights; /health says loading).

        One thread does it and stays until `stop`: a local Ray's processes get their parent-death signal when the
        thread that started them ends, so that thread must live as long as the cluster, and it shuts Ray down."""

        def run() -> None:
            try:
                self.connect()
                handle = self.deploy(model, load, settings)
            except BaseException as e:
                log.error("starting the replicas failed: %s", e)
                loop.call_soon_threadsafe(worker.fail_loading, f"starting the replicas of {model} failed: {e}")
                if on_failure is not None:
                    on_failure(e)
            else:
                loop.call_soon_threadsafe(worker.deployed, handle, self.registry)
            self._closing.wait()
            try:
                self.close()
            except Exception:
                log.exception("stopping the replicas failed")

        self._thread = threading.Thread(target=run, name="kleinbild-ray", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Delete the application and, if it was started here, stop Ray (blocking)."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout)
