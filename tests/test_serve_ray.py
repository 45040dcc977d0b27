"""`kleinbild serve --replicas`: the HTTP front on a real uvicorn on loopback, a local Ray with two replicas of the
tiny random model, one CPU thread each. Requests spread over both; progress and cancel reach the replica that runs
the job; a replica SIGKILLed mid-job loses no job and comes back; 50 concurrent requests are all answered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'kleinbild[ray]')")

from serving import LiveServer, sse_events  # noqa: E402
from tiny import reference_pipeline  # noqa: E402

from kleinbild.serve import ServerSettings, create_app  # noqa: E402
from kleinbild.serve.settings import ReplicaOptions  # noqa: E402

SMALL = {"size": "64x64", "steps": 2}


def wait_for(what, timeout: float = 90.0, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what.__doc__ or what}")


def ready_replicas(srv) -> list[dict]:
    r = srv.client.get("/health")
    return [x for x in r.json().get("replicas", []) if x["state"] == "ready"]


@pytest.fixture(scope="module")
def server():
    model = str(reference_pipeline("distilled", deep_text=True)[1])
    options = ReplicaOptions(replicas=2, cpus_per_replica=1, num_cpus=2, log_to_driver=False, max_retries=3)
    settings = ServerSettings(max_batch=2, max_queue=8, max_steps=2000, max_pixels=96 * 96, preview_every=0)
    srv = LiveServer(create_app(model=model, settings=settings, replicas=options))
    try:
        wait_for(lambda: len(ready_replicas(srv)) == 2, timeout=180)
        yield srv
    finally:
        srv.stop()
    import ray

    assert not ray.is_initialized(), "the local Ray is stopped with the server"


def test_health_lists_the_replicas_and_requests_spread_over_them(server):
    replicas = ready_replicas(server)
    assert {tuple(sorted(r)) for r in replicas} == {("cancelled", "id", "jobs", "node", "pid", "queue_depth",
                                                      "running_images", "seen_seconds_ago", "state", "steps")}
    assert len({r["pid"] for r in replicas}) == 2 and os.getpid() not in {r["pid"] for r in replicas}
    health = server.client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ready"

    def one(i: int) -> dict:
        r = server.client.post("/v1/images/generations", json={"prompt": f"a dot {i}", "seed": i, **SMALL})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    ran_on = {a["kleinbild"]["replica"] for a in answers}
    assert ran_on == {r["id"] for r in replicas}, "both replicas took requests"
    # A replica's result is the engine's: the same seed gives the same image wherever it ran.
    again = server.client.post("/v1/images/generations", json={"prompt": "a dot 3", "seed": 3, **SMALL}).json()
    assert again["data"][0]["b64_json"] == answers[3]["data"][0]["b64_json"]
    metrics = server.client.get("/metrics").text
    assert 'kleinbild_replicas{state="ready"} 2' in metrics


def test_progress_and_cancel_go_through_the_replica(server):
    c = server.client
    job = c.post("/v1/jobs", json={"prompt": "a square", "seed": 1, "size": "64x64", "steps": 5}).json()
    events = sse_events(c, job["id"])
    names = [e[1] for e in events]
    assert names == ["queued", "running", *["progress"] * 5, "succeeded"], names
    assert events[1][2]["replica"] in {r["id"] for r in ready_replicas(server)}
    assert [e[2]["step"] for e in events if e[1] == "progress"] == [1, 2, 3, 4, 5]
    assert events[-1][2]["result"]["kleinbild"]["replica"] == events[1][2]["replica"]

    before = {r["id"]: r for r in ready_replicas(server)}
    long = c.post("/v1/jobs", json={"prompt": "a long one", "seed": 2, "size": "64x64", "steps": 2000}).json()
    wait_for(lambda: c.get(f"/v1/jobs/{long['id']}").json()["progress"]["step"] > 0)
    r = c.delete(f"/v1/jobs/{long['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"

    def stopped():
        """the replica to count the cancel and go idle"""
        now = {x["id"]: x for x in ready_replicas(server)}
        return [x for i, x in now.items() if i in before and x["cancelled"] == before[i]["cancelled"] + 1
                and x["running_images"] == 0]

    (replica,) = wait_for(stopped, timeout=30)
    assert replica["steps"] - before[replica["id"]]["steps"] < 2000, "it stopped after the current step"


def test_a_replica_killed_mid_job_loses_no_job_and_comes_back(server):
    c = server.client
    first = {r["id"] for r in ready_replicas(server)}
    jobs = [c.post("/v1/jobs", json={"prompt": f"job {i}", "seed": i, "size": "64x64", "steps": 300}).json()["id"]
            for i in range(4)]

    def busy():
        """a replica running a job"""
        return [r for r in ready_replicas(server) if r["running_images"] > 0]

    victim = wait_for(busy, timeout=30)[0]
    os.kill(victim["pid"], signal.SIGKILL)
    finals = []
    for job_id in jobs:
        events = sse_events(c, job_id)
        terminal = [e for e in events if e[1] in ("succeeded", "failed", "cancelled")]
        assert [e[1] for e in terminal] == ["succeeded"], events[-3:]  # answered once, with its result
        finals.append(events)
    retried = [ev for ev in finals if any(e[1] == "retry" for e in ev)]
    assert retried, "the killed replica's jobs ran again elsewhere"
    for ev in retried:
        retry = next(e[2] for e in ev if e[1] == "retry")
        assert retry["attempt"] == 1 and "Actor" in retry["reason"]
        ran_on = ev[-1][2]["result"]["kleinbild"]["replica"]
        assert ran_on != victim["id"]

    def recovered():
        """Serve to restart the killed replica"""
        now = ready_replicas(server)
        return len(now) == 2 and victim["id"] not in {r["id"] for r in now}

    wait_for(recovered, timeout=120)
    assert len({r["id"] for r in ready_replicas(server)} - first) == 1, "one new replica in place of the dead one"
    assert c.post("/v1/images/generations", json={"prompt": "after", "seed": 1, **SMALL}).status_code == 200


def test_fifty_concurrent_requests_are_all_answered(server):
    def one(i: int) -> tuple[int, bool]:
        r = server.client.post("/v1/images/generations", json={"prompt": f"load {i}", "seed": i, **SMALL})
        return r.status_code, bool(r.status_code == 200 and r.json()["data"][0]["b64_json"])

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(50)))
    codes = [a[0] for a in answers]
    assert len(answers) == 50 and set(codes) <= {200, 429}, codes
    assert all(ok for code, ok in answers if code == 200)
    assert codes.count(200) >= 8, "the queue's worth at least went through"
    health = server.client.get("/health").json()
    assert health["queue_depth"] == 0 and health["running_images"] == 0, "nothing left behind"


def test_ray_is_not_imported_without_replicas(tmp_path):
    code = ("import sys; from kleinbild.serve import create_app; from kleinbild.cli import main; "
            "create_app(model='nano'); main(['serve', '--help'])\n"
            "assert 'ray' not in sys.modules, 'ray was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--replicas" in r.stdout and "--ray-address" in r.stdout


@pytest.mark.parametrize(("flags", "words"), [
    (["--ray-address", "auto"], "--ray-address needs --replicas"),
    (["--min-replicas", "2"], "--min-replicas needs --max-replicas"),
    (["--min-replicas", "3", "--max-replicas", "2"], "1 <= min <= max"),
])
def test_bad_replica_flags_are_one_clear_line(flags, words, capsys):
    from kleinbild.cli import main

    assert main(["serve", "-m", "nano", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err

