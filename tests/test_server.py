"""The HTTP server against a real uvicorn on loopback, with the tiny random model: the OpenAI client, both edit
forms, jobs with server-sent progress, cancel, the bounded queue, batching, caches, every bad input, keys, load.

Generations are 64x64 with 2 steps so the whole module stays within seconds on a shared CPU.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from tiny import reference_pipeline  # noqa: E402

from kleinbild.pipeline import KleinPipeline  # noqa: E402
from kleinbild.serve.app import ServerSettings, create_app  # noqa: E402

SMALL = {"size": "64x64", "steps": 2}


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return reference_pipeline("distilled", deep_text=True)[1]


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> KleinPipeline:
    return KleinPipeline.from_pretrained(model_dir, device="cpu", dtype="float32")


class LiveServer:
    """uvicorn in a thread of this process on a free loopback port, so tests can also reach into the pipeline."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not shut down"


@contextmanager
def live(pipe: KleinPipeline, **settings):
    srv = LiveServer(create_app(pipe, settings=ServerSettings(**settings)))
    try:
        yield srv
    finally:
        srv.stop()


class Gate:
    """Holds the worker inside generate_batch (before any step) until released, to fill the queue on purpose."""

    def __init__(self, pipe: KleinPipeline):
        self.pipe = pipe
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[int] = []
        real = pipe.generate_batch

        def gated(requests, callback=None):
            self.batches.append(len(requests))
            self.entered.set()
            if not self.release.wait(60):
                raise RuntimeError("the test never opened the gate")
            return real(requests, callback=callback)

        pipe.generate_batch = gated

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        del self.pipe.generate_batch


@pytest.fixture(scope="module")
def server(pipe: KleinPipeline):
    with live(pipe, max_pixels=96 * 96, max_image_pixels=256 * 256, max_upload_bytes=600_000, max_queue=16) as srv:
        yield srv
    assert not srv.app.state.store.folder.exists(), "the server's own output folder is removed on shutdown"


def png_bytes(w: int = 64, h: int = 64, seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR).save(buf, format=fmt)
    return buf.getvalue()


def image_of(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def sse_events(client: httpx.Client, job_id: str, headers: dict | None = None) -> list[tuple[int, str, dict]]:
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers or {}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        ev: dict = {}
        for line in r.iter_lines():
            if line.startswith("id: "):
                ev["id"] = int(line[4:])
            elif line.startswith("event: "):
                ev["event"] = line[7:]
            elif line.startswith("data: "):
                ev["data"] = json.loads(line[6:])
            elif line == "" and "event" in ev:
                events.append((ev["id"], ev["event"], ev["data"]))
                ev = {}
    return events


# ---------------------------------------------------------------- the engine additions the server stands on


def test_generate_batch_matches_single_runs_and_reports_cache(pipe):
    reqs = [dict(prompt=f"a red circle {i}", width=64, height=64, steps=2, seed=i) for i in range(3)]
    reqs.append(dict(prompt="a tall one", width=64, height=80, steps=2, seed=9))  # another shape: its own batch
    single = [pipe.generate(**r) for r in reqs]
    batch = pipe.generate_batch(reqs)
    for a, b in zip(single, batch, strict=True):
        assert max_diff(a.images[0], b.images[0]) <= 1
    assert [b.settings["batch_size"] for b in batch] == [3, 3, 3, 1]
    assert batch[0].settings["cache"]["prompt_hits"] == 1, "the prompts were encoded by the single runs"

    ref = Image.open(io.BytesIO(png_bytes(64, 64, 3)))
    pipe.clear_caches()
    first = pipe.generate("make it blue", [ref], steps=1, seed=1)
    again = pipe.generate("make it blue", [ref.copy()], steps=1, seed=1)
    assert first.settings["cache"] == {"prompt_misses": 1, "reference_misses": 1, "saved_seconds": 0.0}
    assert again.settings["cache"]["prompt_hits"] == 1 and again.settings["cache"]["reference_hits"] == 1
    assert again.settings["cache"]["saved_seconds"] > 0
    assert max_diff(first.images[0], again.images[0]) == 0
    pipe.configure_caches(0, 0)
    try:
        off = pipe.generate("make it blue", [ref], steps=1, seed=1)
        assert "prompt_hits" not in off.settings["cache"] and max_diff(first.images[0], off.images[0]) == 0
    finally:
        pipe.configure_caches(32, 32)


# ---------------------------------------------------------------- the OpenAI API


def test_openai_client_generates(server, pipe):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    res = client.images.generate(prompt="a red circle", size="64x64", n=2, extra_body={"seed": 5, "steps": 2})
    assert len(res.data) == 2 and res.size == "64x64" and res.output_format == "png"
    imgs = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in res.data]
    assert all(im.size == (64, 64) and im.format == "PNG" for im in imgs)
    assert [d.seed for d in res.data] == [5, 6], "each image's seed comes back"
    assert res.usage.output_tokens == 2 * 16 * 16 and res.usage.input_tokens_details.text_tokens > 0
    assert imgs[1].text["seed"] == "6"
    # Each image reproduces alone from its own seed (batched or not, within 1/255).
    alone = client.images.generate(prompt="a red circle", size="64x64", extra_body={"seed": 6, "steps": 2})
    assert max_diff(imgs[1].convert("RGB"), image_of(alone.data[0].model_dump()).convert("RGB")) <= 1

    res = client.images.generate(prompt="a red circle", size="64x64", response_format="url", output_format="jpeg",
                                 output_compression=80, extra_body={"steps": 2})
    url = res.data[0].url
    assert url.startswith(server.url + "/v1/files/")
    got = server.client.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(got.content)).format == "JPEG"


def test_openai_client_edits_with_one_and_several_images(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    one = client.images.edit(image=("a.png", png_bytes(64, 64, 1), "image/png"), prompt="make it blue",
                             extra_body={"steps": 2, "seed": 1})
    assert one.size == "64x64", "size auto follows the reference"
    two = client.images.edit(image=[("a.png", png_bytes(64, 64, 1), "image/png"),
                                    ("b.webp", png_bytes(72, 64, 2, "WEBP"), "image/webp")],
                             prompt="the two together", size="64x64", extra_body={"steps": 2, "seed": 1})
    assert one.model_extra["kleinbild"]["references"] == 1
    assert two.model_extra["kleinbild"]["references"] == 2
    assert image_of(two.data[0].model_dump()).size == (64, 64)


def test_edit_forms_agree(server):
    """multipart image / image[] parts, JSON base64, data URIs and image_url objects: one image, one result."""
    raw = png_bytes(64, 64, 7)
    b64 = base64.b64encode(raw).decode()
    fields = {"prompt": "swap the colours", "seed": 3, **SMALL}
    form = {k: str(v) for k, v in fields.items()}
    c = server.client
    answers = [
        c.post("/v1/images/edits", data=form, files=[("image", ("x.png", raw, "image/png"))]),
        c.post("/v1/images/edits", data=form, files=[("image[]", ("x.png", raw, "application/octet-stream"))]),
        c.post("/v1/images/edits", json={**fields, "image": b64}),
        c.post("/v1/images/edits", json={**fields, "image": ["data:image/png;base64," + b64]}),
        c.post("/v1/images/edits", json={**fields, "images": [{"image_url": "data:image/png;base64," + b64}]}),
        c.post("/v1/jobs", json={**fields, "images": [b64]}),
    ]
    for r in answers[:-1]:
        assert r.status_code == 200, r.text
    job = answers[-1].json()
    assert answers[-1].status_code == 202 and job["kind"] == "edit"
    images = [image_of(r.json()["data"][0]) for r in answers[:-1]]
    for im in images[1:]:
        assert max_diff(images[0], im) == 0
    # The later requests found the prompt and the reference in the caches.
    cache = answers[4].json()["kleinbild"]["cache"]
    assert cache.get("prompt_hits") == 1 and cache.get("reference_hits") == 1 and cache["saved_seconds"] > 0
    final = sse_events(c, job["id"])[-1]
    assert final[1] == "succeeded" and max_diff(images[0], image_of(final[2]["result"]["data"][0])) <= 1


def test_models_health_and_metrics(server):
    c = server.client
    assert c.post("/v1/images/generations", json={"prompt": "for the metrics", **SMALL}).status_code == 200
    models = c.get("/v1/models").json()
    card = models["data"][0]
    assert models["object"] == "list" and card["id"] == "pipe-distilled-deep" and card["ready"]
    assert card["kleinbild"]["limits"]["max_pixels"] == 96 * 96
    assert c.get(f"/v1/models/{card['id']}").status_code == 200
    h = c.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ready"
    text = c.get("/metrics").text
    for name in ("kleinbild_http_requests_total{", "kleinbild_queue_depth ", "kleinbild_stage_seconds_bucket{",
                 "kleinbild_images_generated_total ", "kleinbild_cache_hits_total{", 'stage="denoise"',
                 'stage="queue"', "kleinbild_batch_images_count"):
        assert name in text, name
    for line in text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2 and float(line.rsplit(" ", 1)[1]) >= 0, line


# ---------------------------------------------------------------- jobs


def test_job_events_are_ordered_and_complete(server):
    c = server.client
    r = c.post("/v1/jobs", json={"prompt": "a dot", "size": "64x64", "steps": 3, "seed": 11})
    assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    job = r.json()
    assert job["status"] in ("queued", "running") and job["request"]["seeds"] == [11]
    events = sse_events(c, job["id"])
    names = [e[1] for e in events]
    assert names == ["queued", "running", "progress", "progress", "progress", "succeeded"], names
    assert [e[0] for e in events] == list(range(len(events)))
    steps = [(e[2]["step"], e[2]["total"]) for e in events if e[1] == "progress"]
    assert steps == [(1, 3), (2, 3), (3, 3)]
    # Late subscribers get every step; only the newest preview is kept in the history.
    assert "preview" in events[-2][2]
    preview = events[-2][2]["preview"]
    assert preview.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(preview.split(",", 1)[1]))).size == (64, 64)
    final = events[-1][2]
    assert final["status"] == "succeeded" and final["result"]["data"][0]["seed"] == 11
    assert c.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
    resumed = sse_events(c, job["id"], headers={"Last-Event-ID": "3"})
    assert [e[0] for e in resumed] == [4, 5]


def test_cancel_queued_and_running_jobs(server, pipe):
    c = server.client
    steps_seen: list[int] = []
    real = pipe.generate_batch
    inside, go = threading.Event(), threading.Event()

    def slow(requests, callback=None):
        def cb(step, total, latent):
            steps_seen.append(step)
            inside.set()
            go.wait(30)
            callback(step, total, latent)

        return real(requests, callback=cb)

    pipe.generate_batch = slow
    try:
        running = c.post("/v1/jobs", json={"prompt": "one", "size": "64x64", "steps": 6}).json()
        assert inside.wait(30)
        queued = c.post("/v1/jobs", json={"prompt": "two", "size": "64x80", "steps": 2}).json()
        assert c.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"
        assert c.delete(f"/v1/jobs/{queued['id']}").json()["status"] == "cancelled"
        assert c.delete(f"/v1/jobs/{running['id']}").json()["status"] == "cancelled"
        go.set()
        events = sse_events(c, running["id"])
        assert events[-1][1] == "cancelled" and "result" not in [e[1] for e in events]
        assert [e[1] for e in sse_events(c, queued["id"])] == ["queued", "cancelled"]
        deadline = time.monotonic() + 10
        while c.get("/health").json()["running_images"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert max(steps_seen) < 6, "the running job stopped between steps"
    finally:
        del pipe.generate_batch
        go.set()
    assert_openai_error(c.delete(f"/v1/jobs/{running['id']}"), 409, code="job_finished")
    r = c.post("/v1/images/generations", json={"prompt": "still serving", **SMALL})
    assert r.status_code == 200


def test_queue_full_answers_429_and_loses_nothing(pipe):
    with live(pipe, max_queue=2, max_pixels=96 * 96) as srv, Gate(pipe) as gate:
        c = srv.client
        first = c.post("/v1/jobs", json={"prompt": "a", **SMALL}).json()
        assert gate.entered.wait(30)
        waiting = [c.post("/v1/jobs", json={"prompt": p, **SMALL}) for p in ("b", "c")]
        assert all(r.status_code == 202 for r in waiting)
        full = c.post("/v1/jobs", json={"prompt": "d", **SMALL})
        err = assert_openai_error(full, 429, code="queue_full")
        assert err["type"] == "rate_limit_error" and int(full.headers["retry-after"]) >= 1
        sync = c.post("/v1/images/generations", json={"prompt": "e", **SMALL})
        assert sync.status_code == 429
        assert c.get("/health").json()["queue_depth"] == 2
        gate.release.set()
        ids = [first["id"]] + [r.json()["id"] for r in waiting]
        finals = [sse_events(c, i)[-1] for i in ids]
        assert [f[1] for f in finals] == ["succeeded"] * 3
        assert gate.batches == [1, 2], "the two waiting jobs shared a batch"
        metrics = c.get("/metrics").text
        assert 'kleinbild_jobs_total{status="succeeded"} 3' in metrics
        assert 'kleinbild_jobs_rejected_total{reason="queue_full"} 2' in metrics


def test_a_client_that_leaves_frees_its_queue_slot(pipe):
    with live(pipe, max_pixels=96 * 96) as srv, Gate(pipe) as gate:
        c = srv.client
        c.post("/v1/jobs", json={"prompt": "hold", **SMALL})
        assert gate.entered.wait(30)
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/images/generations", json={"prompt": "impatient", **SMALL}, timeout=0.3)
        deadline = time.monotonic() + 10
        while 'kleinbild_jobs_total{status="cancelled"} 1' not in c.get("/metrics").text:
            assert time.monotonic() < deadline, "the abandoned job was not cancelled"
            time.sleep(0.05)
        assert c.get("/health").json()["queue_depth"] == 0


def test_compatible_requests_share_a_forward_pass(pipe):
    with live(pipe, max_pixels=96 * 96, max_batch=4) as srv, Gate(pipe) as gate:
        c = srv.client
        c.post("/v1/jobs", json={"prompt": "hold", **SMALL})
        assert gate.entered.wait(30)
        same = [c.post("/v1/jobs", json={"prompt": f"p{i}", "seed": i, **SMALL}).json() for i in range(3)]
        other = c.post("/v1/jobs", json={"prompt": "q", "size": "80x64", "steps": 2}).json()
        pair = c.post("/v1/jobs", json={"prompt": "r", "n": 2, **SMALL}).json()  # 3 + 2 > 4: next batch
        gate.release.set()
        views = [sse_events(c, j["id"])[-1][2] for j in [*same, other, pair]]
        assert [v["status"] for v in views] == ["succeeded"] * 5
        assert [v["batch_size"] for v in views] == [3, 3, 3, 1, 2]
        assert gate.batches == [1, 3, 1, 2]


def test_a_job_larger_than_a_batch_runs_in_chunks(pipe):
    with live(pipe, max_pixels=96 * 96, max_batch=2) as srv:
        job = srv.client.post("/v1/jobs", json={"prompt": "three", "n": 3, "seed": 40, **SMALL}).json()
        events = sse_events(srv.client, job["id"])
        steps = [(e[2]["step"], e[2]["total"]) for e in events if e[1] == "progress"]
        assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)], "one progress count over both chunks"
        assert [d["seed"] for d in events[-1][2]["result"]["data"]] == [40, 41, 42]


def test_engine_exception_fails_the_job_not_the_worker(server, pipe):
    def broken(requests, callback=None):
        raise RuntimeError("simulated device fault")

    pipe.generate_batch = broken
    try:
        r = server.client.post("/v1/images/generations", json={"prompt": "boom", **SMALL})
    finally:
        del pipe.generate_batch
    err = assert_openai_error(r, 500, code="engine_error")
    assert "simulated device fault" in err["message"] and err["type"] == "server_error"
    ok = server.client.post("/v1/images/generations", json={"prompt": "after the fault", **SMALL})
    assert ok.status_code == 200 and server.client.get("/health").json()["status"] == "ready"


# ---------------------------------------------------------------- bad input: 4xx, OpenAI-shaped, never a 500


def _bad_requests(big: bytes) -> list[tuple[str, str, dict, int, str | None]]:
    gif = io.BytesIO()
    Image.new("RGB", (64, 64)).save(gif, format="GIF")
    gen, edit = "/v1/images/generations", "/v1/images/edits"
    png = png_bytes()
    b64 = base64.b64encode(png).decode()
    return [
        ("POST", gen, {"json": {"prompt": "a", "size": "big"}}, 400, "size"),
        ("POST", gen, {"json": {"prompt": "a", "size": "32x32"}}, 400, "size"),
        ("POST", gen, {"json": {"prompt": "a", "size": "4096x4096"}}, 400, "size"),
        ("POST", gen, {"json": {"prompt": "a", "size": 64}}, 400, "size"),
        ("POST", gen, {"json": {"prompt": "a", "n": 0}}, 400, "n"),
        ("POST", gen, {"json": {"prompt": "a", "n": 99}}, 400, "n"),
        ("POST", gen, {"json": {"prompt": "a", "n": "2"}}, 400, "n"),
        ("POST", gen, {"json": {"prompt": "a", "n": 1.5}}, 400, "n"),
        ("POST", gen, {"json": {"prompt": "a", "steps": 0}}, 400, "steps"),
        ("POST", gen, {"json": {"prompt": "a", "steps": 10_000}}, 400, "steps"),
        ("POST", gen, {"json": {"prompt": "a", "seed": -1}}, 400, "seed"),
        ("POST", gen, {"json": {"prompt": "a", "seed": True}}, 400, "seed"),
        ("POST", gen, {"json": {"prompt": "a", "guidance": "lots"}}, 400, "guidance"),
        ("POST", gen, {"content": b'{"prompt": "a", "guidance": 1' + b"0" * 400 + b"}",
                       "headers": {"content-type": "application/json"}}, 400, "guidance"),
        ("POST", gen, {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}},
         400, None),
        ("POST", gen, {"json": {"prompt": "a", "negative_prompt": ["x"]}}, 400, "negative_prompt"),
        ("POST", gen, {"json": {"size": "64x64"}}, 400, "prompt"),
        ("POST", gen, {"json": {"prompt": "   "}}, 400, "prompt"),
        ("POST", gen, {"json": {"prompt": {"text": "a"}}}, 400, "prompt"),
        ("POST", gen, {"json": {"prompt": "a" * 40_000}}, 400, "prompt"),
        ("POST", gen, {"content": b'{"prompt": "\\ud800"}', "headers": {"content-type": "application/json"}}, 400,
         "prompt"),
        ("POST", gen, {"json": {"prompt": "a", "colour": "red"}}, 400, "colour"),
        ("POST", gen, {"json": {"prompt": "a", "response_format": "jpeg"}}, 400, "response_format"),
        ("POST", gen, {"json": {"prompt": "a", "output_format": "gif"}}, 400, "output_format"),
        ("POST", gen, {"json": {"prompt": "a", "output_compression": 101}}, 400, "output_compression"),
        ("POST", gen, {"json": {"prompt": "a", "stream": True}}, 400, "stream"),
        ("POST", gen, {"json": {"prompt": "a", "background": "transparent"}}, 400, "background"),
        ("POST", gen, {"json": {"prompt": "a", "model": "dall-e-3"}}, 404, "model"),
        ("POST", gen, {"json": {"prompt": "a", "image": b64}}, 400, "image"),
        ("POST", gen, {"json": ["prompt", "a"]}, 400, None),
        ("POST", gen, {"content": b'{"prompt": "a",', "headers": {"content-type": "application/json"}}, 400, None),
        ("POST", gen, {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 400, None),
        ("POST", gen, {"content": b"prompt=a", "headers": {"content-type": "text/plain"}}, 415, None),
        ("POST", gen, {"content": b"prompt=a"}, 415, None),
        ("POST", gen, {"data": {"prompt": "a"}, "files": [("image", ("a.png", png, "image/png"))]}, 415, None),
        ("POST", gen, {"content": big, "headers": {"content-type": "application/json"}}, 413, None),
        ("POST", edit, {"data": {"prompt": "a"}}, 400, "image"),
        ("POST", edit, {"json": {"prompt": "a"}}, 400, "image"),
        ("POST", edit, {"data": {"prompt": "a", "n": "two"},
                        "files": [("image", ("a.png", png, "image/png"))]}, 400, "n"),
        ("POST", edit, {"data": {"prompt": "a"}, "files": [("image", ("a.png", png, "image/png"))] * 5}, 400, "image"),
        ("POST", edit, {"data": {"prompt": "a"}, "files": [("image", ("a.png", b"not an image", "image/png"))]},
         400, "image"),
        ("POST", edit, {"data": {"prompt": "a"}, "files": [("image", ("a.png", png[: len(png) // 2], "image/png"))]},
         400, "image"),
        ("POST", edit, {"data": {"prompt": "a"}, "files": [("image", ("a.png", b"", "image/png"))]}, 400, "image"),
        ("POST", edit, {"data": {"prompt": "a"}, "files": [("image", ("a.gif", gif.getvalue(), "image/gif"))]},
         415, "image"),
        ("POST", edit, {"data": {"prompt": "a"}, "files": [("image", ("a.png", png_bytes(300, 300), "image/png"))]},
         413, "image"),
        ("POST", edit, {"data": {"prompt": "a"}, "files": [("image", ("a.png", png_bytes(32, 32), "image/png"))]},
         400, "image"),
        ("POST", edit, {"data": {"prompt": "a"}, "files": [("mask", ("m.png", png, "image/png")),
                                                           ("image", ("a.png", png, "image/png"))]}, 400, "mask"),
        ("POST", edit, {"data": {"prompt": "a", "prompt2": "b"}, "files": [("image", ("a.png", png, "image/png"))]},
         400, "prompt2"),
        ("POST", edit, {"json": {"prompt": "a", "image": "%%%not base64%%%"}}, 400, "image"),
        ("POST", edit, {"json": {"prompt": "a", "image": "https://example.com/cat.png"}}, 400, "image"),
        ("POST", edit, {"json": {"prompt": "a", "image": 42}}, 400, "image"),
        ("POST", edit, {"json": {"prompt": "a", "images": [{"file_id": "file-1"}]}}, 400, "images[0]"),
        ("POST", edit, {"json": {"prompt": "a", "image": "data:image/png,abc"}}, 400, "image"),
        ("POST", edit, {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}},
         400, None),
        ("POST", "/v1/jobs", {"json": {"prompt": "a", "size": "64x"}}, 400, "size"),
        ("GET", "/v1/jobs/job_nope", {}, 404, "id"),
        ("DELETE", "/v1/jobs/job_nope", {}, 404, "id"),
        ("GET", "/v1/jobs/job_nope/events", {}, 404, "id"),
        ("GET", "/v1/files/nope.png", {}, 404, None),
        ("GET", "/v1/files/..%2F..%2Fetc%2Fpasswd", {}, 404, None),
        ("GET", "/v1/files/%2Fetc%2Fpasswd", {}, 404, None),
        ("GET", "/v1/models/other-model", {}, 404, None),
        ("GET", "/v1/nothing-here", {}, 404, None),
        ("PUT", gen, {"json": {"prompt": "a"}}, 405, None),
    ]


def _server_errors(client: httpx.Client) -> float:
    lines = client.get("/metrics").text.splitlines()
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines
               if x.startswith("kleinbild_http_requests_total") and 'status="5' in x)


def test_every_bad_input_gets_a_clear_4xx(server):
    errors_before = _server_errors(server.client)
    big = b'{"prompt": "' + b"a" * 700_000 + b'"}'
    bad = _bad_requests(big)
    for method, path, kw, status, param in bad:
        r = server.client.request(method, path, **kw)
        assert_openai_error(r, status, param)
    assert server.client.get("/health").json()["status"] == "ready"
    # Chunked upload with no Content-Length: the limit holds while reading.
    r = server.client.post("/v1/images/generations", content=iter([b'{"prompt": "', b"a" * 700_000, b'"}']),
                           headers={"content-type": "application/json"})
    assert_openai_error(r, 413, code="request_too_large")
    assert _server_errors(server.client) == errors_before


def test_url_results_expire_and_live_in_the_output_folder(pipe, tmp_path):
    with live(pipe, output_dir=str(tmp_path), ttl=1.0, max_pixels=96 * 96) as srv:
        r = srv.client.post("/v1/images/generations", json={"prompt": "a", "response_format": "url", **SMALL})
        url = r.json()["data"][0]["url"]
        name = url.rsplit("/", 1)[1]
        assert (tmp_path / name).is_file() and len(name) > 20
        assert srv.client.get(url).status_code == 200
        time.sleep(1.3)
        assert_openai_error(srv.client.get(url), 404, code="file_not_found")
        assert not (tmp_path / name).exists()
    assert tmp_path.is_dir(), "a folder the user gave is not removed"


def test_api_keys(pipe):
    openai = pytest.importorskip("openai")
    with live(pipe, api_keys=("k-one", "k-two"), max_pixels=96 * 96) as srv:
        c = srv.client
        body = {"prompt": "a", "response_format": "url", **SMALL}
        assert_openai_error(c.post("/v1/images/generations", json=body), 401, code="invalid_api_key")
        wrong = c.post("/v1/images/generations", json=body, headers={"Authorization": "Bearer k-on"})
        assert_openai_error(wrong, 401)
        assert c.get("/metrics").status_code == 401 and c.get("/v1/models").status_code == 401
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        ok = c.post("/v1/images/generations", json=body, headers={"Authorization": "Bearer k-two"})
        assert ok.status_code == 200
        assert c.get(ok.json()["data"][0]["url"]).status_code == 200, "result URLs are capabilities"
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k-one", max_retries=0)
        assert client.models.list().data[0].id == "pipe-distilled-deep"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_cors_is_off_unless_configured(server, pipe):
    pre = {"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"}
    r = server.client.options("/v1/images/generations", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    with live(pipe, cors_origins=("http://elsewhere.example",)) as srv:
        r = srv.client.options("/v1/images/generations", headers=pre)
        assert r.headers["access-control-allow-origin"] == "http://elsewhere.example"


def test_health_says_loading_until_the_model_is_there(model_dir, monkeypatch):
    loaded = threading.Event()
    real = KleinPipeline.from_pretrained

    def slow_load(*args, **kwargs):
        loaded.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(KleinPipeline, "from_pretrained", slow_load)
    app = create_app(model=str(model_dir), settings=ServerSettings(max_pixels=96 * 96),
                     load_options={"device": "cpu", "dtype": "float32"})
    srv = LiveServer(app)
    try:
        h = srv.client.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "loading"
        r = srv.client.post("/v1/images/generations", json={"prompt": "a", **SMALL})
        assert_openai_error(r, 503, code="model_loading")
        assert r.headers["retry-after"]
        loaded.set()
        deadline = time.monotonic() + 30
        while srv.client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert srv.client.post("/v1/images/generations", json={"prompt": "a", **SMALL}).status_code == 200
    finally:
        loaded.set()
        srv.stop()


# ---------------------------------------------------------------- load


def test_fifty_concurrent_requests_all_answered(pipe):
    with live(pipe, max_queue=8, max_batch=8, max_pixels=96 * 96) as srv:
        health_ms: list[float] = []
        stop = threading.Event()

        def watch_health() -> None:
            with httpx.Client(base_url=srv.url, timeout=10) as hc:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    assert hc.get("/health").status_code == 200
                    health_ms.append(1000 * (time.perf_counter() - t0))
                    time.sleep(0.02)

        def one(i: int) -> tuple[int, dict]:
            with httpx.Client(base_url=srv.url, timeout=120) as hc:
                r = hc.post("/v1/images/generations", json={"prompt": f"shape {i % 5}", "seed": i, **SMALL})
                return r.status_code, r.json()

        watcher = threading.Thread(target=watch_health)
        watcher.start()
        try:
            with concurrent.futures.ThreadPoolExecutor(50) as ex:
                answers = list(ex.map(one, range(50)))
        finally:
            stop.set()
            watcher.join()
        codes = [a[0] for a in answers]
        assert len(answers) == 50 and set(codes) <= {200, 429}, codes
        ok = [a[1] for a in answers if a[0] == 200]
        assert ok, "some requests must get through"
        assert len({o["kleinbild"]["job"] for o in ok}) == len(ok), "no answer twice"
        assert all(a[1]["error"]["code"] == "queue_full" for a in answers if a[0] == 429)
        metrics = srv.client.get("/metrics").text
        assert f'kleinbild_jobs_total{{status="succeeded"}} {len(ok)}' in metrics
        assert f'kleinbild_jobs_rejected_total{{reason="queue_full"}} {codes.count(429)}' in metrics
        h = srv.client.get("/health").json()
        assert h["status"] == "ready" and h["queue_depth"] == 0
        batches = max(o["kleinbild"]["batch_size"] for o in ok)
        p95 = sorted(health_ms)[int(0.95 * (len(health_ms) - 1))]
        print(f"\n50 concurrent: {codes.count(200)} x 200, {codes.count(429)} x 429, largest batch {batches}, "
              f"/health under load: median {np.median(health_ms):.1f} ms, p95 {p95:.1f} ms, "
              f"max {max(health_ms):.1f} ms ({len(health_ms)} probes)")
        # The target is 100 ms; CI shares its CPU with other work, so the test asks for less.
        assert p95 < 1000


# ---------------------------------------------------------------- the command line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_runs_and_stops(model_dir):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kleinbild.cli", "serve", "--model", str(model_dir), "--dtype", "float32",
         "--device", "cpu", "--port", str(port), "--max-pixels", "9216", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        r = httpx.post(url + "/v1/images/generations", json={"prompt": "a", **SMALL}, timeout=60)
        assert r.status_code == 200
        assert httpx.get(url + "/").text.startswith("<!doctype html>")
    finally:
        proc.send_signal(2)
        try:
            rc = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0


def test_cli_serve_exits_when_the_model_cannot_load(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kleinbild.cli", "serve", "--model", str(tmp_path / "missing"), "--port",
         str(_free_port()), "--log-level", "error"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 1
    assert "missing" in proc.stderr
