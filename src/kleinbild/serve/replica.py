"""One Ray Serve replica: the model loaded once, its own `Worker` (queue, batching, previews) fed by the front's
calls, each call streaming one job's events back. Also the registry actor the replicas report to, so the front's
/health can list them. Imported only in Ray worker processes and by `serve.replicas`; Ray is imported lazily.

A call's stream: ("running", {...}), ("progress", {...}) ..., then one terminal event: ("succeeded", {"outputs":
[(bytes, seed)], "settings": {...}}), ("failed", {"error": {...}}) or ("cancelled", {}). The replica never writes
files: images travel back as bytes and the front stores them.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from kleinbild.serve.metrics import Metrics
from kleinbild.serve.store import OutputStore
from kleinbild.serve.worker import CANCELLED, FAILED, QUEUED, SUCCEEDED, Delivery, Job, JobError, Worker, WorkerLimits

if TYPE_CHECKING:
    from kleinbild.loading import LoadOptions
    from kleinbild.request import Request

HEARTBEAT_SECONDS = 0.5
NAMESPACE = "kleinbild"  # the Ray namespace of the front and its registry (replicas live in Serve's)


class Registry:
    """A Ray actor: the latest report of every replica (the front reads it for /health)."""

    def __init__(self) -> None:
        self.replicas: dict[str, dict[str, Any]] = {}

    def report(self, info: dict[str, Any]) -> None:
        self.replicas[info["id"]] = {**info, "seen": time.time()}

    def snapshot(self) -> list[dict[str, Any]]:
        return list(self.replicas.values())

    def forget(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)


class KleinbildReplica:
    """The deployment's class (`serve.deployment` wraps it at run time)."""

    def __init__(self, model: str, options: LoadOptions, limits: WorkerLimits, caches: tuple[int, int],
                 registry: str | None, threads: int | None):
        import ray
        from ray import serve

        from kleinbild.pipeline import KleinPipeline

        if threads:
            import torch

            torch.set_num_threads(threads)
        self.info: dict[str, Any] = {"id": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(),
                                     "node": ray.get_runtime_context().get_node_id(), "state": "loading",
                                     "running_images": 0, "queue_depth": 0, "jobs": 0, "steps": 0, "cancelled": 0}
        self._registry = ray.get_actor(registry, namespace=NAMESPACE) if registry else None
        self._stop = threading.Event()
        threading.Thread(target=self._beat, name="kleinbild-heartbeat", daemon=True).start()
        pipe = KleinPipeline.from_pretrained(model, options)
        pipe.configure_caches(*caches)
        self._files = tempfile.TemporaryDirectory(prefix="kleinbild-replica-")
        self.worker = Worker(limits, OutputStore(self._files.name, limits.ttl), Metrics())
        self.worker.attach(pipe)
        self.info["state"] = "ready"

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            w = getattr(self, "worker", None)
            if w is not None:
                self.info.update(running_images=w.running, queue_depth=w.queue_depth)
            if self._registry is not None:
                try:
                    self._registry.report.remote(dict(self.info))
                except Exception:  # the front (and its registry) is gone; Serve will stop this replica
                    return

    def _started(self) -> Worker:
        if self.worker._loop is None:  # the worker's loop is the one Serve runs these calls on
            self.worker.start(asyncio.get_running_loop())
        return self.worker

    async def run(self, request: Request, delivery: Delivery, job_id: str) -> AsyncIterator[tuple[str, dict]]:
        worker = self._started()
        job = Job(request, replace(delivery, response_format="b64_json"), id=job_id)
        try:
            worker.submit(job)
        except Exception as e:  # QueueFull or shutting down: the front decides what to do (retry elsewhere)
            yield FAILED, {"error": asdict(JobError(503, f"replica {self.info['id']}: {e}", code="replica_busy")),
                           "retry": True}
            return
        self.info["jobs"] += 1
        try:
            async for event in self._follow(job):
                yield event
        finally:
            if not job.terminal:  # the front cancelled the call, or went away: stop after the current step
                worker.cancel(job)
                self.info["cancelled"] += 1
            worker.jobs.pop(job.id, None)

    async def _follow(self, job: Job) -> AsyncIterator[tuple[str, dict]]:
        sent = 0
        while True:
            job.changed.clear()
            while sent < len(job.events):
                name, data = job.events[sent]
                sent += 1
                if name == QUEUED:
                    continue
                if data is None:  # terminal
                    yield name, self._final(job)
                    return
                if name == "progress":
                    self.info["steps"] += 1
                yield name, {**data, "replica": self.info["id"]}
            await job.changed.wait()

    def _final(self, job: Job) -> dict[str, Any]:
        if job.state == SUCCEEDED:
            return {"outputs": [(o.data, o.seed) for o in job.outputs],
                    "settings": {**job.settings, "replica": self.info["id"]}}
        if job.state == FAILED and job.error is not None:
            return {"error": asdict(job.error)}
        assert job.state == CANCELLED
        return {}

    async def check_health(self) -> None:
        thread = self.worker._thread
        if thread is not None and not thread.is_alive():
            raise RuntimeError("the replica's worker thread has stopped")

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
