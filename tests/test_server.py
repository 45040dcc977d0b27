"""The HTTP server end to end, on a real uvicorn on loopback with the tiny random model: the OpenAI client, both
edit forms, a job with server-sent progress and real previews, caches, the seed rule against the CLI, every bad
input, keys, loading, `kleinbild serve`. Queue, batching and cancel run against a fake in test_serve_worker.py.

Generations are 64x64 with 2 steps so the whole module stays within seconds on a shared CPU.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serving import (  # noqa: E402
    LiveServer,
    assert_openai_error,
    image_of,
    live,
    max_diff,
    png_bytes,
    sse_events,
)
from tiny import reference_pipeline  # noqa: E402

from kleinbild.cli import main  # noqa: E402
from kleinbild.loading import LoadOptions  # noqa: E402
from kleinbild.pipeline import KleinPipeline  # noqa: E402
from kleinbild.serve import ServerSettings, create_app  # noqa: E402

SMALL = {"size": "64x64", "steps": 2}


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return reference_pipeline("distilled", deep_text=True)[1]


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> KleinPipeline:
    return KleinPipeline.from_pretrained(model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(pipe: KleinPipeline):
    with live(pipe, max_pixels=96 * 96, max_image_pixels=256 * 256, max_upload_bytes=600_000, max_queue=16) as srv:
        yield srv
    assert not srv.app.state.store.folder.exists(), "the server's own output folder is removed on shutdown"


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


def test_server_images_follow_the_cli_seed_rule(server, model_dir, tmp_path, capsys):
    """The server's n=2, seed=8 image 2 is the CLI's --seed 9 image (one seed rule everywhere)."""
    r = server.client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "seed": 8, **SMALL})
    second = image_of(r.json()["data"][1])
    out = tmp_path / "nine.png"
    assert main(["generate", "a red circle", "-m", str(model_dir), "--seed", "9", "--steps", "2", "-W", "64", "-H",
                 "64", "--dtype", "float32", "--device", "cpu", "--offload", "none", "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    # The same noise, bit for bit; a batch of two rounds its float32 matmuls a little differently than one image.
    assert max_diff(second.convert("RGB"), Image.open(out).convert("RGB")) <= 1
    assert json.loads(second.text["kleinbild"])["seed"] == 9
    # A server PNG carries what makes it again on the command line, alone.
    served = tmp_path / "served.png"
    served.write_bytes(base64.b64decode(r.json()["data"][1]["b64_json"]))
    assert main(["generate", "--from", str(served), "-o", str(tmp_path / "again.png"), "-q"]) == 0
    assert max_diff(Image.open(tmp_path / "again.png").convert("RGB"), Image.open(out).convert("RGB")) == 0


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
                     load_options=LoadOptions(device="cpu", dtype="float32"))
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
        proc.send_signal(15)  # SIGTERM, as a service manager stops it
        try:
            rc = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0


def test_cli_serve_fails_at_once_in_one_line(tmp_path):
    """A missing model, a port out of range and a port in use: one error line, exit 2, nothing announced."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        for args, message in ((["--model", str(tmp_path / "missing")], "missing"),
                              (["--port", "99999"], "port must be from 0 to 65535"),
                              (["--port", str(busy.getsockname()[1])], "cannot listen on 127.0.0.1")):
            proc = subprocess.run([sys.executable, "-m", "kleinbild.cli", "serve", "--log-level", "error", *args],
                                  capture_output=True, text=True, timeout=60, env=env)
            err = proc.stderr.strip()
            assert proc.returncode == 2 and message in err and len(err.splitlines()) == 1, (proc.returncode, err)
            assert "Uvicorn running" not in proc.stdout + err
    finally:
        busy.close()
