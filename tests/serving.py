"""Helpers for the server tests: uvicorn on loopback in a thread, server-sent events, OpenAI-shaped errors."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import uvicorn
from PIL import Image

from kleinbild.serve import ServerSettings, create_app
from kleinbild.serve.app import graceful_server


class LiveServer:
    """uvicorn in a thread of this process on a free loopback port, so tests can also reach into the pipeline."""

    def __init__(self, app):
        self.app = app
        # The server `kleinbild serve` runs, so shutdown behaves as it does there.
        self.server = graceful_server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"), app)
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
def live(pipe, **settings):
    srv = LiveServer(create_app(pipe, settings=ServerSettings(**settings)))
    try:
        yield srv
    finally:
        srv.stop()


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
