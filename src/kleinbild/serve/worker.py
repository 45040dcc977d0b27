"""The job worker: jobs, the bounded queue, the one thread that owns the pipeline, batching and progress previews.
Nothing here knows HTTP.

Threads: the asyncio loop owns every `Job` field that clients read (state, events, results); the worker thread
only reads a job's request and its cancel flag and hands everything else back with `loop.call_soon_threadsafe`,
so no job needs a lock and events reach subscribers in the order they happened.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from kleinbild import __version__
from kleinbild.images import InputError, encode_image
from kleinbild.serve.metrics import Metrics
from kleinbild.serve.store import OutputStore

if TYPE_CHECKING:
    from torch import Tensor

    from kleinbild.pipeline import KleinPipeline
    from kleinbild.request import Request
    from kleinbild.result import GenerationResult

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class NotReady(Exception):
    """The model is still loading (or failed to load)."""


@dataclass
class JobError:
    status: int
    message: str
    type: str = "server_error"
    code: str | None = None
    param: str | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Delivery:
    """How the images go back: the parts of an HTTP request that are not the engine's."""

    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int = 100
    kind: str = "generation"
    notes: tuple[str, ...] = ()  # about the HTTP fields (the engine's own notes are the request's)
    previews: bool = False  # only async jobs have someone to show them to; a preview costs a (small) decode
    downscale: int = 16  # pixels per latent token side, for `usage`


@dataclass
class Output:
    data: bytes
    seed: int
    file_id: str | None = None


@dataclass(eq=False)
class Job:
    request: Request
    delivery: Delivery = field(default_factory=Delivery)
    id: str = field(default_factory=lambda: "job_" + secrets.token_urlsafe(12))
    created: float = field(default_factory=time.time)
    state: str = QUEUED
    started: float | None = None
    finished: float | None = None
    step: int = 0
    total: int = 0
    batch_size: int = 0
    outputs: list[Output] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    error: JobError | None = None
    # (event name, data); terminal events carry None and are rendered when sent (they need the request's URL).
    events: list[tuple[str, dict[str, Any] | None]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Future | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)

    reference_sizes: tuple[tuple[int, int], ...] = ()  # what the API reports after the references are dropped

    def __post_init__(self) -> None:
        self.reference_sizes = tuple(r.size for r in self.request.references)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def n(self) -> int:
        return self.request.num_images

    def drop_inputs(self) -> None:
        """A finished job keeps only what the API returns: its reference pixels (and any noise) go."""
        self.request = replace(self.request, references=(), reference_digests=(), noise=None)


@dataclass
class WorkerLimits:
    max_queue: int = 64
    max_batch: int = 8
    preview_every: int = 1
    preview_px: int = 256
    ttl: float = 3600.0
    max_jobs_kept: int = 1000


class Worker:
    """One worker thread that owns the pipeline, fed by a bounded queue of jobs.

    The worker takes the oldest job and every queued job that can share its forward pass (equal
    `Request.batch_key()`) up to `max_batch` images, and runs them as one `pipe.run` call.
    """

    def __init__(self, limits: WorkerLimits, store: OutputStore, metrics: Metrics):
        self.limits = limits
        self.store = store
        self.metrics = metrics
        self.pipe: KleinPipeline | None = None
        self.status = "loading"
        self.load_error: str | None = None
        self.jobs: dict[str, Job] = {}
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._running: list[Job] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kleinbild-encode")
        self._job_seconds = 1.0  # running mean of a batch's wall time, for Retry-After

    # -------------------------------------------------------- lifecycle (loop thread)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._work, name="kleinbild-worker", daemon=True)
        self._thread.start()

    def attach(self, pipe: KleinPipeline) -> None:
        self.pipe = pipe
        self.status = "ready"
        with self._cv:
            self._cv.notify_all()

    def fail_loading(self, message: str) -> None:
        self.status = "failed"
        self.load_error = message

    def stop(self) -> None:
        """Refuse new work and answer every queued or running job (loop thread); then call `join`."""
        with self._cv:
            self._stopping = True
            waiting = list(self._pending) + list(self._running)
            self._pending.clear()
            for job in waiting:
                job.cancel.set()
            self._cv.notify_all()
        for job in waiting:
            self._finish(job, FAILED, JobError(503, "the server is shutting down; the job did not finish",
                                               code="shutdown"))

    def join(self, timeout: float = 30.0) -> None:
        """Wait for the worker to leave its batch (it stops at the next step) and for pending encodes (blocking)."""
        if self._thread is not None:
            self._thread.join(timeout)
        self._encoder.shutdown(wait=True)

    # -------------------------------------------------------- client side (loop thread)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return sum(j.n for j in self._running)

    def retry_after(self) -> int:
        batches_ahead = 1 + len(self._pending) / max(1, self.limits.max_batch)
        return max(1, math.ceil(self._job_seconds * batches_ahead))

    def check_room(self) -> None:
        """Raise QueueFull now when a job could not be queued, before its images are decoded for nothing."""
        if len(self._pending) >= self.limits.max_queue:
            self.metrics.inc("kleinbild_jobs_rejected_total", reason="queue_full")
            raise QueueFull(self.retry_after())

    def submit(self, job: Job) -> Job:
        if self.status != "ready":
            raise NotReady(self.load_error or "the model is still loading")
        assert self._loop is not None
        job.done = self._loop.create_future()
        with self._cv:
            if self._stopping:
                raise NotReady("the server is shutting down")
            if len(self._pending) >= self.limits.max_queue:
                self.metrics.inc("kleinbild_jobs_rejected_total", reason="queue_full")
                raise QueueFull(self.retry_after())
            job.enqueued_at = time.perf_counter()
            self._pending.append(job)
            self.jobs[job.id] = job
            self._cv.notify()
        self.metrics.inc("kleinbild_jobs_accepted_total")
        self._event(job, QUEUED, {"status": QUEUED, "position": len(self._pending)})
        return job

    def cancel(self, job: Job) -> bool:
        """Cancel a queued or running job at once; False when it had already finished."""
        if job.terminal:
            return False
        with self._cv:
            if job in self._pending:
                self._pending.remove(job)
            job.cancel.set()
        self._finish(job, CANCELLED, None)
        return True

    def replica_list(self) -> list[dict[str, Any]] | None:
        """The replicas serving the jobs (Ray Serve); None for this in-process worker."""
        return None

    def purge(self) -> None:
        """Forget finished jobs past their TTL (or past the count bound, oldest first) and expired files."""
        now = time.time()
        done = sorted((j for j in self.jobs.values() if j.terminal), key=lambda j: j.finished or 0)
        excess = max(0, len(done) - self.limits.max_jobs_kept)
        for i, job in enumerate(done):
            if i < excess or (job.finished or now) + self.limits.ttl <= now:
                self.jobs.pop(job.id, None)
        self.store.purge()

    # -------------------------------------------------------- state changes (loop thread only)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed between the check and the call: nobody is listening
            pass

    def _event(self, job: Job, name: str, data: dict[str, Any] | None) -> None:
        if name == "progress" and job.events and job.events[-1][0] == "progress":
            # Keep every step for late subscribers but only the newest preview, so history stays small.
            self._drop_preview(job)
        job.events.append((name, data))
        job.changed.set()

    @staticmethod
    def _drop_preview(job: Job) -> None:
        name, prev = job.events[-1]
        if name == "progress" and prev is not None and "preview" in prev:
            job.events[-1] = ("progress", {k: v for k, v in prev.items() if k != "preview"})

    def _mark_running(self, job: Job, batch_size: int) -> None:
        if job.terminal or job.state == RUNNING:  # a retry on its own after a failed batch: already said
            return
        job.state = RUNNING
        job.started = time.time()
        job.batch_size = batch_size
        self._event(job, RUNNING, {"status": RUNNING, "batch_size": batch_size})

    def _progress(self, job: Job, step: int, total: int, preview: str | None) -> None:
        if job.terminal:
            return
        job.step, job.total = step, total
        data: dict[str, Any] = {"step": step, "total": total}
        if preview is not None:
            data["preview"] = preview
        self._event(job, "progress", data)

    def _finish(self, job: Job, state: str, error: JobError | None, outputs: list[Output] | None = None,
                settings: dict[str, Any] | None = None) -> None:
        if job.terminal:  # a cancelled job's late result, or a second failure: answered once only
            for o in outputs or ():
                if o.file_id:
                    self.store.drop(o.file_id)
            return
        job.state, job.error = state, error
        job.outputs, job.settings = outputs or [], settings or {}
        job.drop_inputs()
        job.finished = time.time()
        if job.events:
            self._drop_preview(job)
        self._event(job, state, None)
        self.metrics.inc("kleinbild_jobs_total", status=state)
        if state == SUCCEEDED:
            self.metrics.inc("kleinbild_images_generated_total", len(job.outputs))
            self.metrics.observe("kleinbild_stage_seconds", job.finished - job.created, stage="total")
        if job.done is not None and not job.done.done():
            job.done.set_result(None)

    # -------------------------------------------------------- worker thread

    def _take_batch(self) -> list[Job]:
        head = self._pending.popleft()
        batch, rows = [head], head.n
        key = head.request.batch_key()
        for job in list(self._pending):
            if rows + job.n <= self.limits.max_batch and job.request.batch_key() == key:
                self._pending.remove(job)
                batch.append(job)
                rows += job.n
        return batch

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and (not self._pending or self.pipe is None):
                    self._cv.wait()
                if self._stopping:
                    return
                batch = self._take_batch()
                self._running = batch
            try:
                self._run(batch)
            except Exception:  # the worker must outlive anything a batch does
                log.exception("worker: unexpected failure")
                for job in batch:
                    self._post(self._finish, job, FAILED, JobError(500, "internal error in the worker"))
            finally:
                with self._cv:
                    self._running = []

    def _run(self, batch: list[Job]) -> None:
        from kleinbild.result import GenerationCancelled

        live = [j for j in batch if not j.cancel.is_set()]
        if not live:
            return
        rows = sum(j.n for j in live)
        now = time.perf_counter()
        for job in live:
            self.metrics.observe("kleinbild_stage_seconds", now - job.enqueued_at, stage="queue")
            self._post(self._mark_running, job, rows)
        t0 = time.perf_counter()
        try:
            results = self._generate(live)
        except GenerationCancelled:
            return  # every job of the batch was cancelled; each was answered when it was
        except Exception as e:
            self._failed(live, e)
            return
        self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.perf_counter() - t0)
        self.metrics.inc("kleinbild_batches_total")
        self.metrics.observe("kleinbild_batch_images", rows)
        timings = results[0][0].settings.get("timings", {})
        for stage in ("text", "references", "denoise", "decode"):
            if stage in timings:
                self.metrics.observe("kleinbild_stage_seconds", timings[stage], stage=stage)
        for job, res in zip(live, results, strict=True):
            self._encoder.submit(self._deliver, job, res, self._text_tokens(job.request.prompt))

    def _failed(self, live: list[Job], e: Exception) -> None:
        if len(live) > 1:
            # One bad request must not fail its batchmates: run each on its own.
            log.warning("batch of %d jobs failed (%s); running them one by one", len(live), e)
            for job in live:
                self._run([job])
            return
        job = live[0]
        if isinstance(e, InputError):
            err = JobError(400, str(e), type="invalid_request_error", code="invalid_value")
        else:
            log.exception("job %s failed in the engine", job.id)
            err = JobError(500, f"the engine failed: {type(e).__name__}: {e}", code="engine_error")
        self._post(self._finish, job, FAILED, err)

    def _text_tokens(self, prompt: str) -> int:
        """Prompt tokens for `usage` (worker thread: the tokenizer keeps padding state and is not shareable)."""
        assert self.pipe is not None
        try:
            return int(self.pipe.prompt_tokens(prompt))
        except Exception:  # usage is informative; never fail a finished job over it
            return 0

    def _generate(self, jobs: list[Job]) -> list[list[GenerationResult]]:
        """Each job's results: one for a batch of jobs; one per chunk for a lone job larger than `max_batch`
        (by the seed rule the chunks make the same images as the whole)."""
        from kleinbild.result import GenerationCancelled

        pipe = self.pipe
        assert pipe is not None

        def all_cancelled(_step: int, _total: int, _latent: Tensor) -> None:
            if all(j.cancel.is_set() for j in jobs):
                raise GenerationCancelled()

        if len(jobs) > 1 or jobs[0].n <= self.limits.max_batch:
            callbacks = [self._progress_callback(j) for j in jobs]
            return [[r] for r in pipe.run([j.request for j in jobs], all_cancelled, callbacks)]
        job = jobs[0]
        chunks = job.request.split(self.limits.max_batch)
        overall = len(chunks) * job.request.steps
        out = []
        for k, chunk in enumerate(chunks):
            cb = self._progress_callback(job, k * job.request.steps, overall)
            out += pipe.run([chunk], all_cancelled, [cb])
        return [out]

    def _progress_callback(self, job: Job, offset: int = 0, overall: int | None = None
                           ) -> Callable[[int, int, Tensor], None]:
        every = self.limits.preview_every

        def on_step(step: int, total: int, latent: Tensor) -> None:
            if job.cancel.is_set():
                return
            done, of = offset + step, overall or total
            preview = None
            if job.delivery.previews and every > 0 and (done % every == 0 or done == of):
                t0 = time.perf_counter()
                preview = self._preview(latent[:1])
                self.metrics.observe("kleinbild_stage_seconds", time.perf_counter() - t0, stage="preview")
            self._post(self._progress, job, done, of, preview)

        return on_step

    def _preview(self, latent: Tensor) -> str:
        """A real decode of the latent, area-pooled first so the preview's long side is at most `preview_px`.

        Decoding cost scales with pixels, so a 256 px preview of a 1024 px image costs 1/16 of the final decode;
        a pooled latent decodes to a blurred version of the image (what a preview needs), not to noise.
        """
        import torch.nn.functional as F

        pipe = self.pipe
        assert pipe is not None
        ds = pipe.preset.ae.downscale
        h, w = latent.shape[-2:]
        factor = max(1, math.ceil(max(h, w) * ds / self.limits.preview_px))
        if factor > 1:
            latent = F.interpolate(latent.float(), size=(max(1, h // factor), max(1, w // factor)), mode="area")
        img = pipe.decode(latent)[0]
        if max(img.size) > self.limits.preview_px:
            img.thumbnail((self.limits.preview_px, self.limits.preview_px))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=70)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()

    def _deliver(self, job: Job, results: list[GenerationResult], text_tokens: int) -> None:
        """Encode a job's images (on the encoder thread, so the worker can start the next batch) and finish it."""
        try:
            t0 = time.perf_counter()
            d = job.delivery
            outputs = []
            for res in results:
                for i, img in enumerate(res.images):
                    meta = {**res.image_settings(i), "software": f"kleinbild {__version__}"}
                    out = Output(encode_image(img, d.output_format, meta, d.output_compression), meta["seed"])
                    if d.response_format == "url":
                        out.file_id = self.store.put(out.data, d.output_format)
                        out.data = b""  # on disk now; the job is kept for its TTL and need not hold it twice
                    outputs.append(out)
            settings = _merged_settings(results, d, text_tokens)
            self.metrics.observe("kleinbild_stage_seconds", time.perf_counter() - t0, stage="encode_output")
            self._post(self._finish, job, SUCCEEDED, None, outputs, settings)
        except Exception as e:
            log.exception("job %s: encoding the result failed", job.id)
            err = JobError(500, f"encoding the result failed: {e}", code="encode_error")
            self._post(self._finish, job, FAILED, err)


def _merged_settings(results: list[GenerationResult], delivery: Delivery, text_tokens: int) -> dict[str, Any]:
    """One job's settings from its chunks' results: cache counts summed, seeds in order, HTTP notes added."""
    settings = dict(results[0].settings)
    cache: dict[str, float] = {}
    for res in results:
        for k, v in res.settings.get("cache", {}).items():
            cache[k] = round(cache.get(k, 0) + v, 4)
    settings["cache"] = cache
    settings["seeds"] = [s for res in results for s in res.settings.get("seeds", [])]
    settings["notes"] = list(settings.get("notes", [])) + list(delivery.notes)
    settings["text_tokens"] = text_tokens
    return settings
