"""The server's queue, batching, chunking, cancel and progress events, against a fake pipeline (instant images), over
real HTTP on loopback. The end-to-end runs with a real model are in test_server.py."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fake_pipeline import FakePipeline, colour_of  # noqa: E402
from serving import assert_openai_error, image_of, live, png_bytes, sse_events  # noqa: E402

SMALL = {"size": "128x128", "steps": 2}


@pytest.fixture
def fake() -> FakePipeline:
    return FakePipeline()


def test_each_image_has_its_own_seed_and_reproduces_alone(fake):
    with live(fake) as srv:
        two = srv.client.post("/v1/images/generations", json={"prompt": "a dot", "n": 2, "seed": 8, **SMALL}).json()
        assert [d["seed"] for d in two["data"]] == [8, 9]
        second = image_of(two["data"][1])
        assert second.getpixel((0, 0)) == colour_of(9, "a dot")
        assert second.text["seed"] == "9" and '"num_images": 1' in second.text["kleinbild"]
        assert fake.calls[-1][0].seeds == (8, 9), "the engine got one request with seeds 8 and 9"


def test_job_events_are_ordered_and_complete(fake):
    with live(fake) as srv:
        c = srv.client
        job = c.post("/v1/jobs", json={"prompt": "a dot", "size": "128x128", "steps": 3, "seed": 11}).json()
        assert job["request"]["seeds"] == [11]
        events = sse_events(c, job["id"])
        names = [e[1] for e in events]
        assert names == ["queued", "running", "progress", "progress", "progress", "succeeded"], names
        assert [e[0] for e in events] == list(range(len(events)))
        assert [(e[2]["step"], e[2]["total"]) for e in events if e[1] == "progress"] == [(1, 3), (2, 3), (3, 3)]
        # Every step stays in the history and got a preview, but only the newest keeps it (until the job ends:
        # then the result is there), so the history stays small. Whether the stream above saw the previews live
        # depends on when it connected; a subscriber after the end replays the history.
        replay = sse_events(c, job["id"])
        assert [e[:2] for e in replay] == [e[:2] for e in events] and fake.decodes == 3
        assert not any("preview" in e[2] for e in replay)
        assert not any("preview" in (d or {}) for _, d in srv.app.state.worker.jobs[job["id"]].events)
        assert events[-1][2]["result"]["data"][0]["seed"] == 11
        assert [e[0] for e in sse_events(c, job["id"], headers={"Last-Event-ID": "3"})] == [4, 5]
        # The images endpoints have nobody to show previews to: none are decoded.
        assert c.post("/v1/images/generations", json={"prompt": "a dot", **SMALL}).status_code == 200
        assert fake.decodes == 3


def test_queue_full_answers_429_and_loses_nothing(fake):
    fake.gate = threading.Event()
    with live(fake, max_queue=2) as srv:
        c = srv.client
        first = c.post("/v1/jobs", json={"prompt": "a", **SMALL}).json()
        assert fake.entered.wait(10)
        waiting = [c.post("/v1/jobs", json={"prompt": p, **SMALL}) for p in ("b", "c")]
        assert all(r.status_code == 202 for r in waiting)
        full = c.post("/v1/jobs", json={"prompt": "d", **SMALL})
        err = assert_openai_error(full, 429, code="queue_full")
        assert err["type"] == "rate_limit_error" and int(full.headers["retry-after"]) >= 1
        assert c.post("/v1/images/generations", json={"prompt": "e", **SMALL}).status_code == 429
        assert c.get("/health").json()["queue_depth"] == 2
        fake.gate.set()
        ids = [first["id"]] + [r.json()["id"] for r in waiting]
        assert [sse_events(c, i)[-1][1] for i in ids] == ["succeeded"] * 3
        assert fake.batches == [1, 2], "the two waiting jobs shared a batch"
        metrics = c.get("/metrics").text
        assert 'kleinbild_jobs_total{status="succeeded"} 3' in metrics
        assert 'kleinbild_jobs_rejected_total{reason="queue_full"} 2' in metrics


def test_a_client_that_leaves_frees_its_queue_slot(fake):
    fake.gate = threading.Event()
    with live(fake) as srv:
        c = srv.client
        c.post("/v1/jobs", json={"prompt": "hold", **SMALL})
        assert fake.entered.wait(10)
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/images/generations", json={"prompt": "impatient", **SMALL}, timeout=0.3)
        deadline = time.monotonic() + 10
        while 'kleinbild_jobs_total{status="cancelled"} 1' not in c.get("/metrics").text:
            assert time.monotonic() < deadline, "the abandoned job was not cancelled"
            time.sleep(0.05)
        assert c.get("/health").json()["queue_depth"] == 0
        fake.gate.set()


def test_compatible_requests_share_a_forward_pass(fake):
    fake.gate = threading.Event()
    with live(fake, max_batch=4) as srv:
        c = srv.client
        c.post("/v1/jobs", json={"prompt": "hold", **SMALL})
        assert fake.entered.wait(10)
        same = [c.post("/v1/jobs", json={"prompt": f"p{i}", "seed": i, **SMALL}).json() for i in range(3)]
        other = c.post("/v1/jobs", json={"prompt": "q", "size": "144x128", "steps": 2}).json()
        pair = c.post("/v1/jobs", json={"prompt": "r", "n": 2, **SMALL}).json()  # 3 + 2 > 4: next batch
        fake.gate.set()
        views = [sse_events(c, j["id"])[-1][2] for j in [*same, other, pair]]
        assert [v["status"] for v in views] == ["succeeded"] * 5
        assert [v["batch_size"] for v in views] == [3, 3, 3, 1, 2]
        assert fake.batches == [1, 3, 1, 2]
        # Batchmates keep their own prompt and seed.
        for i, v in enumerate(views[:3]):
            assert image_of(v["result"]["data"][0]).getpixel((0, 0)) == colour_of(i, f"p{i}")


def test_a_job_larger_than_a_batch_runs_in_chunks_with_the_same_seeds(fake):
    with live(fake, max_batch=2) as srv:
        job = srv.client.post("/v1/jobs", json={"prompt": "three", "n": 3, "seed": 40, **SMALL}).json()
        events = sse_events(srv.client, job["id"])
        steps = [(e[2]["step"], e[2]["total"]) for e in events if e[1] == "progress"]
        assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)], "one progress count over both chunks"
        data = events[-1][2]["result"]["data"]
        assert [d["seed"] for d in data] == [40, 41, 42]
        assert [image_of(d).getpixel((0, 0)) for d in data] == [colour_of(s, "three") for s in (40, 41, 42)]
        assert [r.seeds for call in fake.calls for r in call] == [(40, 41), (42,)]


def test_cancel_queued_and_running_jobs(fake):
    fake.step_wait = threading.Event()
    with live(fake) as srv:
        c = srv.client
        running = c.post("/v1/jobs", json={"prompt": "one", "size": "128x128", "steps": 6}).json()
        assert fake.entered.wait(10)
        queued = c.post("/v1/jobs", json={"prompt": "two", "size": "128x144", "steps": 2}).json()
        assert c.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"
        assert c.delete(f"/v1/jobs/{queued['id']}").json()["status"] == "cancelled"
        assert c.delete(f"/v1/jobs/{running['id']}").json()["status"] == "cancelled"
        fake.step_wait.set()
        events = sse_events(c, running["id"])
        assert events[-1][1] == "cancelled" and "succeeded" not in [e[1] for e in events]
        assert [e[1] for e in sse_events(c, queued["id"])] == ["queued", "cancelled"]
        deadline = time.monotonic() + 10
        while c.get("/health").json()["running_images"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert max(fake.steps_seen) < 6, "the running job stopped between steps"
        assert_openai_error(c.delete(f"/v1/jobs/{running['id']}"), 409, code="job_finished")
        assert c.post("/v1/images/generations", json={"prompt": "still serving", **SMALL}).status_code == 200


def test_engine_exception_fails_the_job_not_the_worker(fake):
    with live(fake) as srv:
        fake.fail = RuntimeError("simulated device fault")
        err = assert_openai_error(srv.client.post("/v1/images/generations", json={"prompt": "boom", **SMALL}), 500,
                                  code="engine_error")
        assert "simulated device fault" in err["message"] and err["type"] == "server_error"
        fake.fail = None
        ok = srv.client.post("/v1/images/generations", json={"prompt": "after the fault", **SMALL})
        assert ok.status_code == 200 and srv.client.get("/health").json()["status"] == "ready"


def test_engine_limits_and_http_limits_both_answer_400(fake):
    with live(fake, max_pixels=128 * 128, max_n=2) as srv:
        c = srv.client
        assert_openai_error(c.post("/v1/images/generations", json={"prompt": "a", "size": "256x256"}), 400, "size")
        assert_openai_error(c.post("/v1/images/generations", json={"prompt": "a", "n": 3}), 400, "n")
        auto = c.post("/v1/images/generations", json={"prompt": "a", "size": "auto"}).json()
        assert auto["size"] == "128x128"
        odd = c.post("/v1/images/generations", json={"prompt": "a", "size": "100x120"}).json()
        assert odd["size"] == "96x112" and any("rounded down" in n for n in odd["kleinbild"]["notes"])


def test_fifty_concurrent_requests_all_answered(fake):
    fake.step_wait = threading.Event()
    threading.Timer(2.0, fake.step_wait.set).start()  # let the queue fill before anything finishes
    with live(fake, max_queue=8, max_batch=8) as srv:
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
            with httpx.Client(base_url=srv.url, timeout=60) as hc:
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
        assert max(o["kleinbild"]["batch_size"] for o in ok) > 1, "waiting requests were batched"
        p95 = sorted(health_ms)[int(0.95 * (len(health_ms) - 1))]
        print(f"\n50 concurrent: {codes.count(200)} x 200, {codes.count(429)} x 429, /health under load: median "
              f"{np.median(health_ms):.1f} ms, p95 {p95:.1f} ms ({len(health_ms)} probes)")


def test_a_full_queue_refuses_before_decoding_any_image(fake, monkeypatch):
    from kleinbild.serve import protocol

    decoded: list[int] = []
    real = protocol.decode_image
    monkeypatch.setattr(protocol, "decode_image", lambda *a: decoded.append(1) or real(*a))
    fake.gate = threading.Event()
    with live(fake, max_queue=1) as srv:
        c = srv.client
        c.post("/v1/jobs", json={"prompt": "running", **SMALL})
        assert fake.entered.wait(10)
        c.post("/v1/jobs", json={"prompt": "waiting", **SMALL})
        r = c.post("/v1/images/edits", data={"prompt": "x"}, files=[("image", ("a.png", b"not an image", "image/png"))])
        assert_openai_error(r, 429, code="queue_full")
        assert decoded == [], "a refused request's images were decoded"
        fake.gate.set()


def test_a_finished_job_keeps_only_what_the_api_returns(fake):
    with live(fake) as srv:
        b64 = base64.b64encode(png_bytes(128, 128)).decode()
        job = srv.client.post("/v1/jobs", json={"prompt": "edit", "images": [b64], "response_format": "url",
                                                **SMALL}).json()
        final = sse_events(srv.client, job["id"])[-1][2]
        assert final["status"] == "succeeded" and final["request"]["references"] == 1
        kept = srv.app.state.worker.jobs[job["id"]]
        held = sum(r.width * r.height for r in kept.request.references) + sum(len(o.data) for o in kept.outputs)
        assert held == 0 and kept.request.noise is None, "references and url results are not held by the job"
        assert kept.reference_sizes == ((128, 128),) and final["result"]["usage"]["input_tokens_details"][
            "image_tokens"] == 64


@pytest.mark.parametrize("body", [
    b'{"prompt": "a", "user": ' + b"9" * 5000 + b"}",
    b'{"prompt": "a", "n": ' + b"1" * 4400 + b"}",
])
def test_integers_past_the_conversion_limit_are_bad_json(fake, body):
    with live(fake) as srv:
        r = srv.client.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
        assert_openai_error(r, 400, code="invalid_json")
        assert srv.client.get("/health").status_code == 200, "the connection and the server live on"


def test_digits_of_other_scripts_are_refused(fake):
    with live(fake) as srv:
        c = srv.client
        assert_openai_error(c.post("/v1/images/generations", json={"prompt": "a", "size": "１２８x１２８"}), 400,
                            "size")
        png = png_bytes(128, 128)
        for field, value in (("n", "２"), ("steps", "٣"), ("guidance", "１.５")):
            r = c.post("/v1/images/edits", data={"prompt": "a", field: value},
                       files=[("image", ("a.png", png, "image/png"))])
            assert_openai_error(r, 400, field)


def test_empty_api_keys_are_refused_at_start(fake, capsys):
    from kleinbild.cli import main
    from kleinbild.serve import ServerSettings

    with pytest.raises(ValueError, match="API key is empty"):
        ServerSettings(api_keys=("good", ""))
    assert main(["serve", "--api-key", "", "--port", "0"]) == 2
    assert "API key is empty" in capsys.readouterr().err


def test_a_nul_in_the_prompt_stays_out_of_png_text(fake):
    with live(fake) as srv:
        r = srv.client.post("/v1/images/generations", json={"prompt": "a\u0000b", **SMALL})
        img = image_of(r.json()["data"][0])
        assert "\x00" not in img.text["prompt"] and json.loads(img.text["kleinbild"])["prompt"] == "a\u0000b"


def test_only_allowed_hosts_are_answered_and_urls_come_from_configuration(fake):
    with live(fake, allowed_hosts=("127.0.0.1",), public_url="https://images.example.com/") as srv:
        c = srv.client
        evil = c.post("/v1/images/generations", json={"prompt": "a", "response_format": "url", **SMALL},
                      headers={"Host": "evil.example"})
        assert_openai_error(evil, 400, code="invalid_host")
        assert c.get("/health", headers={"Host": "evil.example:8000"}).status_code == 400
        ok = c.post("/v1/images/generations", json={"prompt": "a", "response_format": "url", **SMALL})
        assert ok.json()["data"][0]["url"].startswith("https://images.example.com/v1/files/")


def test_bodies_are_bounded_per_route_and_in_time(fake):
    import socket

    with live(fake, body_timeout=0.5) as srv:
        big = b'{"prompt": "' + b"a" * (2**20 + 10) + b'"}'
        r = srv.client.post("/v1/images/generations", content=big, headers={"content-type": "application/json"})
        assert_openai_error(r, 413, code="request_too_large")
        host, port = srv.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/images/edits HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\":")  # and then nothing
            answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer


def test_big_json_bodies_are_parsed_off_the_event_loop(fake, monkeypatch):
    from kleinbild.serve import protocol

    threads: list[str] = []
    real = protocol.json.loads
    monkeypatch.setattr(protocol.json, "loads", lambda raw: threads.append(threading.current_thread().name)
                        or real(raw))
    with live(fake) as srv:
        b64 = base64.b64encode(png_bytes(128, 128)).decode()
        srv.client.post("/v1/images/edits", json={"prompt": "small", "image": b64[:10], **SMALL})
        srv.client.post("/v1/images/edits", json={"prompt": "big", "image": b64, "user": "x" * 70_000, **SMALL})
    small, big = threads  # one parse each
    assert small != big, "the small body was parsed on the loop, the big one in a worker thread"


def test_serve_on_loopback_allows_only_loopback_names():
    from kleinbild.cli import _allowed_hosts

    assert _allowed_hosts("127.0.0.1", []) == ("127.0.0.1", "localhost", "[::1]")
    assert _allowed_hosts("0.0.0.0", []) == ()
    assert _allowed_hosts("0.0.0.0", ["images.example.com"]) == ("images.example.com",)


def test_shutdown_answers_waiting_clients_and_ends_every_stream(fake):
    from serving import LiveServer

    from kleinbild.serve import ServerSettings, create_app

    fake.step_wait = threading.Event()
    srv = LiveServer(create_app(fake, settings=ServerSettings()))
    try:
        c = srv.client
        job = c.post("/v1/jobs", json={"prompt": "running", **SMALL}).json()
        queued = c.post("/v1/jobs", json={"prompt": "queued", "size": "144x128", "steps": 2}).json()
        assert fake.entered.wait(10)
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            waiting = ex.submit(c.post, "/v1/images/generations", json={"prompt": "waiting", **SMALL})
            streams = [ex.submit(sse_events, c, j["id"]) for j in (job, queued)]
            time.sleep(0.3)
            srv.server.should_exit = True  # what SIGTERM does
            answer = waiting.result(timeout=20)
            ends = [s.result(timeout=20)[-1] for s in streams]
        assert_openai_error(answer, 503, code="shutdown")
        assert [(e[1], e[2]["error"]["code"]) for e in ends] == [("failed", "shutdown")] * 2
    finally:
        fake.step_wait.set()
        srv.thread.join(30)
        srv.client.close()


def test_a_named_output_folder_survives_a_restart_until_the_ttl(tmp_path):
    import os

    from kleinbild.serve.store import OutputStore

    store = OutputStore(tmp_path, ttl=60)
    keep, old = store.put(b"kept", "png"), store.put(b"old", "jpeg")
    store.close()  # a clean exit keeps what has not expired
    assert (tmp_path / keep).is_file() and (tmp_path / old).is_file()
    os.utime(tmp_path / old, (time.time() - 120, time.time() - 120))  # written two minutes ago
    (tmp_path / "notes.txt").write_text("not ours")
    again = OutputStore(tmp_path, ttl=60)  # after a restart, or a kill
    assert again.get(keep) is not None and again.get(keep)[1] == "image/png"
    assert again.get(old) is None and not (tmp_path / old).exists(), "expired results are purged at start"
    assert (tmp_path / "notes.txt").exists(), "files that are not results are left alone"
    temporary = OutputStore(None, ttl=60)
    temporary.put(b"x", "png")
    temporary.close()
    assert not temporary.folder.exists()
