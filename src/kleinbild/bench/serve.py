"""What the Ray path costs: the same HTTP load on the in-process server, on 1 Ray Serve replica and on 2, in one
run (`kleinbild bench --serve`). Each configuration is a real server on loopback; the clients post OpenAI
generations from `concurrency` threads; per-request latency (median, p90) and throughput are measured after a
warm-up, in rounds that alternate the configurations so drift on a noisy machine hits all of them."""

from __future__ import annotations

import math
import platform
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

CONFIGS = ("in-process", "1 replica", "2 replicas")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Server:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app: Any):
        import httpx
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the benchmark server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)

    def wait_ready(self, replicas: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.client.get("/health").json()
            ready = [r for r in body.get("replicas", []) if r["state"] == "ready"]
            if body["status"] == "ready" and len(ready) >= replicas:
                return
            time.sleep(0.25)
        raise RuntimeError("the replicas did not become ready")

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(120)


def _app(config: str, model: str, threads: int, max_batch: int) -> tuple[Any, int]:
    from kleinbild.serve import ServerSettings, create_app
    from kleinbild.serve.settings import ReplicaOptions

    settings = ServerSettings(max_queue=1024, max_batch=max_batch, preview_every=0)
    if config == "in-process":
        import torch

        torch.set_num_threads(threads)
        return create_app(model=model, settings=settings), 0
    n = 1 if config == "1 replica" else 2
    return create_app(model=model, settings=settings, replicas=ReplicaOptions(
        replicas=n, cpus_per_replica=threads, num_cpus=n * threads, log_to_driver=False)), n


def _load(srv: _Server, body: dict[str, Any], requests: int, concurrency: int) -> dict[str, float]:
    def one(i: int) -> float:
        t0 = time.perf_counter()
        r = srv.client.post("/v1/images/generations", json={**body, "seed": i})
        if r.status_code != 200:
            raise RuntimeError(f"request {i}: HTTP {r.status_code}: {r.text[:200]}")
        return time.perf_counter() - t0

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency)))  # warm-up: caches, first-call costs
        t0 = time.perf_counter()
        lat = sorted(pool.map(one, range(1000, 1000 + requests)))
        wall = time.perf_counter() - t0
    return {"latency_median_s": statistics.median(lat), "latency_p90_s": lat[math.ceil(0.9 * len(lat)) - 1],
            "images_per_s": requests / wall}


def run(model: str = "nano", requests: int = 40, concurrency: int = 4, steps: int | None = None,
        threads: int = 1, rounds: int = 2, max_batch: int = 8, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every configuration `rounds` times, alternating; the median of each measure over the rounds. `threads` are
    the torch threads of each engine: the in-process server's, and each replica's (2 replicas use twice the CPUs)."""
    body: dict[str, Any] = {"prompt": "a big red circle in the centre on a blue background"}
    if steps is not None:
        body["steps"] = steps
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in CONFIGS}
    for k in range(rounds):
        for config in CONFIGS:
            app, replicas = _app(config, model, threads, max_batch)
            srv = _Server(app)
            try:
                srv.wait_ready(replicas)
                runs[config].append(_load(srv, body, requests, concurrency))
                say(f"round {k + 1}/{rounds} {config}: {runs[config][-1]}")
            finally:
                srv.stop()
    med = {c: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for c, rs in runs.items()}
    base, one = med["in-process"], med["1 replica"]
    return {"cpu": cpu_name(), "threads": threads, "model": model, "requests": requests, "concurrency": concurrency,
            "rounds": rounds, "max_batch": max_batch, "results": med,
            "ratios": {"1 replica / in-process latency": one["latency_median_s"] / base["latency_median_s"],
                       "1 replica / in-process throughput": one["images_per_s"] / base["images_per_s"],
                       "2 replicas / 1 throughput": med["2 replicas"]["images_per_s"] / one["images_per_s"]}}


def format_table(res: dict[str, Any]) -> str:
    lines = [f"{res['model']} over HTTP, {res['requests']} requests from {res['concurrency']} clients, "
             f"{res['threads']} torch thread(s) per engine, medians of {res['rounds']} rounds; {res['cpu']}",
             f"{'server':<12}{'latency median (s)':>20}{'latency p90 (s)':>17}{'images/s':>10}"]
    for c, r in res["results"].items():
        lines.append(f"{c:<12}{r['latency_median_s']:>20.3f}{r['latency_p90_s']:>17.3f}{r['images_per_s']:>10.2f}")
    lines += [f"{k}: {v:.3f}" for k, v in res["ratios"].items()]
    return "\n".join(lines)
