"""The server's engine room: jobs, the bounded queue, the one worker thread that owns the pipeline, batching,
progress previews, output files and metrics. Nothing here knows HTTP; `kleinbild.serve.app` is the shell.

Threads: the asyncio loop owns every `Job` field that clients read (state, events, results); the worker thread
only reads a job's spec and its cancel flag and hands everything else back with `loop.call_soon_threadsafe`,
so no job needs a lock and events reach subscribers in the order they happened.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import secrets
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, PngImagePlugin

if TYPE_CHECKING:
    from torch import Tensor

    from kleinbild.pipeline import KleinPipeline

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


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


@dataclass
class Spec:
    """A validated request: everything resolved (size, steps, guidance, one seed per image)."""

    prompt: str
    negative_prompt: str | None
    refs: list[Image.Image]
    width: int
    height: int
    steps: int
    guidance: float | None
    seeds: list[int]
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int = 100
    kind: str = "generation"
    notes: list[str] = field(default_factory=list)
    downscale: int = 16  # pixels per latent token side, for usage
    previews: bool = False  # only async jobs have someone to show them to; a preview costs a (small) decode

    def batch_key(self) -> tuple:
        # Mirrors the engine's grouping, so a drained batch is one forward pass per step.
        return (self.width, self.height, self.steps, self.guidance, tuple(r.size for r in self.refs))


@dataclass
class Output:
    data: bytes
    seed: int
    file_id: str | None = None


@dataclass(eq=False)
class Job:
    spec: Spec
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

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


# ---------------------------------------------------------------- metrics


class Metrics:
    """Counters and histograms in the Prometheus text format, written by hand (one process, a few series)."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = {}
        self._hists: dict[str, dict[tuple, list[float]]] = {}
        self._help: dict[str, str] = {}

    def describe(self, name: str, text: str) -> None:
        self._help[name] = text

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters.setdefault(name, {})
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._hists.setdefault(name, {})
            # bucket counts..., sum, count
            h = series.setdefault(key, [0.0] * (len(self.BUCKETS) + 2))
            for i, b in enumerate(self.BUCKETS):
                if value <= b:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def counter(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    @staticmethod
    def _labels(key: tuple, extra: tuple = ()) -> str:
        items = list(key) + list(extra)
        if not items:
            return ""
        esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in items)
        return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(items, esc, strict=True)) + "}"

    def render(self, gauges: dict[str, tuple[str, dict[tuple, float]]],
               counters: dict[str, tuple[str, dict[tuple, float]]] | None = None) -> str:
        """The exposition text; `gauges` and `counters` are read from elsewhere at scrape time."""
        lines: list[str] = []
        with self._lock:
            for kind, extra in (("gauge", gauges), ("counter", counters or {})):
                for name, (help_text, series) in extra.items():
                    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                    lines += [f"{name}{self._labels(k)} {v:g}" for k, v in series.items()]
            for name, series in sorted(self._counters.items()):
                lines += [f"# HELP {name} {self._help.get(name, name)}", f"# TYPE {name} counter"]
                lines += [f"{name}{self._labels(k)} {v:g}" for k, v in sorted(series.items())]
            for name, series in sorted(self._hists.items()):
                lines += [f"# HELP {name} {self._help.get(name, name)}", f"# TYPE {name} histogram"]
                for k, h in sorted(series.items()):
                    for b, c in zip(self.BUCKETS, h, strict=False):
                        lines.append(f"{name}_bucket{self._labels(k, (('le', f'{b:g}'),))} {c:g}")
                    lines.append(f"{name}_bucket{self._labels(k, (('le', '+Inf'),))} {h[-1]:g}")
                    lines.append(f"{name}_sum{self._labels(k)} {h[-2]:.6f}")
                    lines.append(f"{name}_count{self._labels(k)} {h[-1]:g}")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- output files


class OutputStore:
    """Result files under one folder, named by random ids that only this object hands out.

    Lookups go through the id table, never through a path built from a request, so nothing outside the
    folder can be read. Files expire after `ttl` seconds.
    """

    def __init__(self, folder: str | Path | None, ttl: float):
        self.ttl = ttl
        self._owned = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="kleinbild-serve-")) if folder is None else Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, tuple[Path, str, float]] = {}
        self._lock = threading.Lock()

    def put(self, data: bytes, fmt: str) -> str:
        name = f"{secrets.token_urlsafe(18)}.{fmt}"
        path = self.folder / name
        path.write_bytes(data)
        with self._lock:
            self._files[name] = (path, MEDIA_TYPES[fmt], time.time() + self.ttl)
        return name

    def get(self, name: str) -> tuple[Path, str, float] | None:
        with self._lock:
            item = self._files.get(name)
        if item is None:
            return None
        if item[2] <= time.time():
            self.drop(name)
            return None
        return item

    def drop(self, name: str) -> None:
        with self._lock:
            item = self._files.pop(name, None)
        if item is not None:
            item[0].unlink(missing_ok=True)

    def purge(self) -> int:
        now = time.time()
        with self._lock:
            old = [n for n, (_, _, exp) in self._files.items() if exp <= now]
        for n in old:
            self.drop(n)
        return len(old)

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        with self._lock:
            names = list(self._files)
        for n in names:
            self.drop(n)
        if self._owned:
            shutil.rmtree(self.folder, ignore_errors=True)


def encode_image(img: Image.Image, fmt: str, compression: int, meta: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        for k, v in meta.items():
            if v is not None:
                info.add_text(k, str(v))
        info.add_text("kleinbild", json.dumps(meta))
        img.save(buf, format="PNG", pnginfo=info)
    elif fmt == "jpeg":
        img.convert("RGB").save(buf, format="JPEG", quality=max(1, min(compression, 100)))
    else:
        img.save(buf, format="WEBP", quality=max(1, min(compression, 100)))
    return buf.getvalue()


# ---------------------------------------------------------------- the engine


@dataclass
class EngineLimits:
    max_queue: int = 64
    max_batch: int = 8
    preview_every: int = 1
    preview_px: int = 256
    ttl: float = 3600.0
    max_jobs_kept: int = 1000


class Engine:
    """One worker thread that owns the pipeline, fed by a bounded queue of jobs.

    The worker takes the oldest job and every queued job that can share its forward pass (same size, steps,
    guidance, reference sizes) up to `max_batch` images, and runs them as one `generate_batch` call.
    """

    def __init__(self, limits: EngineLimits, store: OutputStore, metrics: Metrics):
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
        return sum(len(j.spec.seeds) for j in self._running)

    def retry_after(self) -> int:
        batches_ahead = 1 + len(self._pending) / max(1, self.limits.max_batch)
        return max(1, math.ceil(self._job_seconds * batches_ahead))

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
            prev = job.events[-1][1]
            if prev is not None and "preview" in prev:
                job.events[-1] = ("progress", {k: v for k, v in prev.items() if k != "preview"})
        job.events.append((name, data))
        job.changed.set()

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
            if outputs:
                for o in outputs:
                    if o.file_id:
                        self.store.drop(o.file_id)
            return
        job.state = state
        job.error = error
        job.outputs = outputs or []
        job.settings = settings or {}
        job.finished = time.time()
        if job.events and job.events[-1][0] == "progress" and job.events[-1][1]:
            job.events[-1] = ("progress", {k: v for k, v in job.events[-1][1].items() if k != "preview"})
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
        batch, rows = [head], len(head.spec.seeds)
        key = head.spec.batch_key()
        for job in list(self._pending):
            n = len(job.spec.seeds)
            if rows + n > self.limits.max_batch:
                continue
            if job.spec.batch_key() == key:
                self._pending.remove(job)
                batch.append(job)
                rows += n
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
        from kleinbild.images import InputError
        from kleinbild.pipeline import GenerationCancelled

        live = [j for j in batch if not j.cancel.is_set()]
        if not live:
            return
        rows = sum(len(j.spec.seeds) for j in live)
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
            return
        elapsed = time.perf_counter() - t0
        self._job_seconds = 0.8 * self._job_seconds + 0.2 * elapsed
        self.metrics.inc("kleinbild_batches_total")
        self.metrics.observe("kleinbild_batch_images", rows)
        timings = results[0].settings.get("timings", {})
        for stage in ("text", "references", "denoise", "decode"):
            if stage in timings:
                self.metrics.observe("kleinbild_stage_seconds", timings[stage], stage=stage)
        at = 0
        for job in live:
            n = len(job.spec.seeds)
            self._encoder.submit(self._deliver, job, results[at : at + n], self._text_tokens(job.spec.prompt))
            at += n

    def _text_tokens(self, prompt: str) -> int:
        """Prompt tokens for `usage` (worker thread: the tokenizer keeps padding state and is not shareable)."""
        pipe = self.pipe
        assert pipe is not None
        try:
            return int(pipe.tokenizer.encode([prompt], pipe.preset.text.max_length)[1].sum())
        except Exception:  # usage is informative; never fail a finished job over it
            return 0

    def _generate(self, jobs: list[Job]) -> list:
        from kleinbild.pipeline import GenerationCancelled

        pipe = self.pipe
        assert pipe is not None
        size = self.limits.max_batch
        # Batches never mix jobs past max_batch images, so only a lone job with n > max_batch is split; its
        # progress then counts over all of its chunks.
        chunks = max(1, math.ceil(sum(len(j.spec.seeds) for j in jobs) / size)) if len(jobs) == 1 else 1
        requests = []
        for job in jobs:
            s = job.spec
            for k, seed in enumerate(s.seeds):
                first_of_chunk = k % size == 0 if chunks > 1 else k == 0
                requests.append(dict(
                    prompt=s.prompt, images=s.refs, width=s.width, height=s.height, steps=s.steps,
                    guidance=s.guidance, negative_prompt=s.negative_prompt, seed=seed,
                    callback=self._progress_callback(job, (k // size) * s.steps, chunks * s.steps)
                    if first_of_chunk else None,
                ))

        def all_cancelled(_step: int, _total: int, _latent: Tensor) -> None:
            if all(j.cancel.is_set() for j in jobs):
                raise GenerationCancelled()

        if chunks == 1:
            return pipe.generate_batch(requests, callback=all_cancelled)
        out = []
        for i in range(0, len(requests), size):
            out += pipe.generate_batch(requests[i : i + size], callback=all_cancelled)
        return out

    def _progress_callback(self, job: Job, offset: int = 0, overall: int | None = None
                           ) -> Callable[[int, int, Tensor], None]:
        every = self.limits.preview_every

        def on_step(step: int, total: int, latent: Tensor) -> None:
            if job.cancel.is_set():
                return
            done, of = offset + step, overall or total
            preview = None
            if job.spec.previews and every > 0 and (done % every == 0 or done == of):
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

    def _deliver(self, job: Job, results: list, text_tokens: int) -> None:
        """Encode a job's images (on the encoder thread, so the worker can start the next batch) and finish it."""
        try:
            t0 = time.perf_counter()
            s = job.spec
            outputs = []
            settings = dict(results[0].settings)
            for res in results:
                st = res.settings
                meta = {
                    "prompt": st["prompt"], "negative_prompt": st["negative_prompt"], "seed": st["seed"],
                    "steps": st["steps"], "guidance": st["guidance"], "width": st["width"], "height": st["height"],
                    "model": st.get("source") or st.get("model"),
                }
                data = encode_image(res.images[0], s.output_format, s.output_compression, meta)
                out = Output(data, st["seed"])
                if s.response_format == "url":
                    out.file_id = self.store.put(data, s.output_format)
                    out.data = b""  # on disk now; the job is kept for its TTL and need not hold it twice
                outputs.append(out)
            cache: dict[str, float] = {}
            for res in results:
                for k, v in res.settings.get("cache", {}).items():
                    cache[k] = round(cache.get(k, 0) + v, 4)
            settings["cache"] = cache
            settings["notes"] = list(dict.fromkeys(s.notes + settings.get("notes", [])))
            settings["seeds"] = [o.seed for o in outputs]
            settings["text_tokens"] = text_tokens
            self.metrics.observe("kleinbild_stage_seconds", time.perf_counter() - t0, stage="encode_output")
            self._post(self._finish, job, SUCCEEDED, None, outputs, settings)
        except Exception as e:
            log.exception("job %s: encoding the result failed", job.id)
            err = JobError(500, f"encoding the result failed: {e}", code="encode_error")
            self._post(self._finish, job, FAILED, err)
