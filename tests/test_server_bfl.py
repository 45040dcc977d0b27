"""The BFL API drop-in (serve/bfl.py) on a real uvicorn on loopback: submit, poll and fetch with the tiny random
model, BFL's status words and error shapes, `x-key`, and signed webhooks to an allowed host only. Queue and
cancel run against the fake pipeline."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("diffusers")
httpx = pytest.importorskip("httpx")

from fake_pipeline import FakePipeline  # noqa: E402
from serving import live, png_bytes  # noqa: E402
from tiny import reference_pipeline  # noqa: E402

from kleinbild.cli import main  # noqa: E402
from kleinbild.pipeline import KleinPipeline  # noqa: E402

MODEL_ID = "pipe-distilled-deep"


@pytest.fixture(scope="module")
def pipe() -> KleinPipeline:
    folder: Path = reference_pipeline("distilled", deep_text=True)[1]
    return KleinPipeline.from_pretrained(folder, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(pipe: KleinPipeline):
    with live(pipe, max_pixels=96 * 96, max_image_pixels=256 * 256, webhook_hosts=("127.0.0.1",)) as srv:
        yield srv


def poll(client: httpx.Client, polling_url: str, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + 120  # a bound against hanging, not a speed check
    while True:
        r = client.get(polling_url, headers=headers or {})
        assert r.status_code == 200, r.text
        view = r.json()
        if view["status"] != "Pending":
            return view
        assert time.monotonic() < deadline, view
        assert 0.0 <= view["progress"] < 1.0
        time.sleep(0.05)


def fetch_image(client: httpx.Client, url: str) -> Image.Image:
    r = client.get(url)
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(r.content))


# ---------------------------------------------------------------- submit, poll, fetch


def test_text_to_image_as_jpeg_round_trip(server):
    c = server.client
    r = c.post("/v1/flux-2-klein-4b", json={"prompt": "a red circle", "width": 80, "height": 64, "seed": 5,
                                            "safety_tolerance": 2, "prompt_upsampling": True})
    assert r.status_code == 200, r.text
    task = r.json()
    assert task["polling_url"] == f"{server.url}/v1/get_result?id={task['id']}"
    assert task["output_mp"] == round(80 * 64 / 1e6, 4) and task["input_mp"] == 0
    view = poll(c, task["polling_url"])
    assert view["status"] == "Ready" and view["id"] == task["id"] and view["progress"] == 1.0, view
    res = view["result"]
    assert res["seed"] == 5 and res["prompt"] == "a red circle" and res["model"] == MODEL_ID
    assert res["sample"].startswith(server.url + "/v1/files/") and res["sample"].endswith(".jpeg")
    notes = " ".join(res["kleinbild"]["notes"])
    assert "safety_tolerance" in notes and "prompt_upsampling" in notes and "flux-2-klein-4b" in notes
    img = fetch_image(c, res["sample"])
    assert img.format == "JPEG" and img.size == (80, 64)


def test_edit_with_input_images_as_png_round_trip(server):
    c = server.client
    raw = png_bytes(64, 64, 3)
    body = {"prompt": "the two together", "input_image": "data:image/png;base64," + base64.b64encode(raw).decode(),
            "input_image_2": base64.b64encode(png_bytes(64, 64, 4)).decode(), "output_format": "png", "seed": 9}
    # Every klein name BFL lists is served by the one model, which the result names.
    r = c.post("/v1/flux-2-klein-9b", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["input_mp"] == round(2 * 64 * 64 / 1e6, 4)
    res = poll(c, r.json()["polling_url"])["result"]
    assert res["model"] == MODEL_ID and res["kleinbild"]["references"] == 2 and res["seed"] == 9
    assert "flux-2-klein-9b is served by" in " ".join(res["kleinbild"]["notes"])
    img = fetch_image(c, res["sample"])
    assert img.format == "PNG" and img.size == (64, 64), "the size follows the first input image"
    assert json.loads(img.text["kleinbild"])["seed"] == 9


def test_task_not_found(server):
    r = server.client.get("/v1/get_result", params={"id": "no-such-task"})
    assert r.status_code == 200  # as BFL's API: the status says it, the HTTP status does not
    assert r.json() == {"id": "no-such-task", "status": "Task not found", "result": None, "progress": None,
                        "details": None, "preview": None}
    missing = server.client.get("/v1/get_result")
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["query", "id"]


# ---------------------------------------------------------------- refused requests, in BFL's shapes


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"prompt": "a", "input_image": "https://example.com/cat.png"}, 400, "not fetched"),
    ({"prompt": "a", "input_image_3": "%%% not base64"}, 400, "input_image_3"),
    ({"prompt": "a", "input_image": base64.b64encode(b"not an image").decode()}, 400, "input_image"),
    ({"prompt": "a", "output_format": "gif"}, 400, "output_format"),
    ({"prompt": "a", "width": 4096, "height": 4096}, 400, "pixels"),
    ({"prompt": "a", "seed": -1}, 400, "seed"),
    ({"prompt": "a", "safety_tolerance": 9}, 400, "safety_tolerance"),
    ({"prompt": "a", "webhook_url": "http://example.com/hook"}, 400, "not allowed"),
    ({"prompt": "a", "webhook_url": "file:///etc/passwd"}, 400, "http"),
    ({"prompt": "a", "webhook_url": "http://user:pw@127.0.0.1/hook"}, 400, "credentials"),
    ({"prompt": "   "}, 400, "empty"),
])
def test_bad_values_get_a_400_saying_what(server, body, status, words):
    r = server.client.post("/v1/flux-2-klein-4b", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"], r.json()


def test_unknown_fields_and_a_missing_prompt_get_a_422_naming_them(server):
    r = server.client.post("/v1/flux-2-klein-4b", json={"prompt": "a", "colour": "red"})
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "colour"] and "'colour'" in err["msg"] and "prompt" in err["msg"]
    r = server.client.post("/v1/flux-2-klein-4b", json={"width": 64})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt"]
    r = server.client.post("/v1/flux-2-klein-4b", content=b"prompt=a", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]


# ---------------------------------------------------------------- keys


def test_x_key_is_an_api_key(pipe, server):
    body = {"prompt": "a", "width": 64, "height": 64}
    # Keys off: any x-key (or none) is fine.
    assert server.client.post("/v1/flux-2-klein-4b", json=body, headers={"x-key": "anything"}).status_code == 200
    with live(pipe, api_keys=("k-one",), max_pixels=96 * 96) as srv:
        c = srv.client
        assert c.post("/v1/flux-2-klein-4b", json=body).status_code == 401
        assert c.post("/v1/flux-2-klein-4b", json=body, headers={"x-key": "k-on"}).status_code == 401
        assert c.get("/v1/get_result", params={"id": "x"}).status_code == 401
        r = c.post("/v1/flux-2-klein-4b", json=body, headers={"x-key": "k-one"})
        assert r.status_code == 200, r.text
        res = poll(c, r.json()["polling_url"], headers={"x-key": "k-one"})["result"]
        assert c.get(res["sample"]).status_code == 200, "result files stay capability URLs"
        assert c.get("/v1/models", headers={"x-key": "k-one"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer k-one"}).status_code == 200
        # No webhook host is allowed on this server: none is called.
        r = c.post("/v1/flux-2-klein-4b", json={**body, "webhook_url": "http://127.0.0.1:9/hook"},
                   headers={"x-key": "k-one"})
        assert r.status_code == 400 and "webhooks are off" in r.json()["detail"]


# ---------------------------------------------------------------- webhooks


class _Receiver:
    """A tiny HTTP server on loopback that records what is posted to it; /fail answers 500."""

    def __init__(self) -> None:
        self.got: queue.Queue = queue.Queue()
        got = self.got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                got.put((self.path, self.headers, body))  # case-insensitive lookups
                self.send_response(500 if self.path == "/fail" else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def receiver():
    rec = _Receiver()
    yield rec
    rec.close()


def test_webhook_to_an_allowed_host_is_signed(server, receiver):
    c = server.client
    body = {"prompt": "a dot", "width": 64, "height": 64, "seed": 2, "output_format": "png",
            "webhook_url": receiver.url + "/hook", "webhook_secret": "s3cret"}
    r = c.post("/v1/flux-2-klein-4b", json=body)
    assert r.status_code == 200, r.text
    path, headers, raw = receiver.got.get(timeout=120)
    assert path == "/hook" and headers["Content-Type"] == "application/json"
    expected = "sha256=" + hmac.new(b"s3cret", raw, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-BFL-Signature"], expected)
    payload = json.loads(raw)
    assert payload["id"] == r.json()["id"] and payload["status"] == "Ready"
    assert payload == poll(c, r.json()["polling_url"]), "the webhook carries what get_result answers"
    assert fetch_image(c, payload["result"]["sample"]).size == (64, 64)


def test_a_failing_webhook_is_logged_and_the_result_stays(server, receiver, caplog):
    c = server.client
    body = {"prompt": "a dot", "width": 64, "height": 64, "webhook_url": receiver.url + "/fail"}
    with caplog.at_level("WARNING", logger="kleinbild.serve.bfl"):
        r = c.post("/v1/flux-2-klein-4b", json=body)
        path, headers, _ = receiver.got.get(timeout=120)
        assert path == "/fail" and "X-BFL-Signature" not in headers, "no secret: unsigned"
        view = poll(c, r.json()["polling_url"])
        deadline = time.monotonic() + 30
        while "answered 500" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.02)
    assert view["status"] == "Ready"
    assert c.get("/health").json()["status"] == "ready"


# ---------------------------------------------------------------- the shared queue, cancel, the flag


def test_the_queue_is_shared_and_cancelled_tasks_are_errors():
    fake = FakePipeline()
    fake.gate = threading.Event()
    with live(fake, max_queue=1) as srv:
        c = srv.client
        body = {"prompt": "a", "width": 64, "height": 64}
        running = c.post("/v1/flux-2-klein-4b", json=body).json()
        assert fake.entered.wait(30)
        queued = c.post("/v1/flux-2-klein-4b", json=body).json()
        full = c.post("/v1/flux-2-klein-4b", json=body)
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1 and "busy" in full.json()["detail"]
        assert c.get("/v1/get_result", params={"id": queued["id"]}).json()["status"] == "Pending"
        assert c.delete(f"/v1/jobs/{queued['id']}").status_code == 200
        view = c.get("/v1/get_result", params={"id": queued["id"]}).json()
        assert view["status"] == "Error" and "cancelled" in view["details"]["message"]
        fake.gate.set()
        assert poll(c, running["polling_url"])["status"] == "Ready"
        assert 'route="/v1/flux-2-klein-4b",status="429"' in c.get("/metrics").text


def test_cli_serve_takes_webhook_hosts(monkeypatch):
    import kleinbild.serve

    seen = {}
    monkeypatch.setattr(kleinbild.serve, "serve", lambda model, **kw: seen.update(kw) or 0)
    assert main(["serve", "--webhook-host", "hooks.example.com", "--webhook-host", "127.0.0.1:9000"]) == 0
    assert seen["settings"].webhook_hosts == ("hooks.example.com", "127.0.0.1:9000")
