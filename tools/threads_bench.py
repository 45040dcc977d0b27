"""nano on a busy and on an idle CPU: warm 128-px generation time for each thread setting, side by side.

A busy machine is simulated by one process spinning on one core. Each setting runs in a fresh process (the
OpenMP runtime reads its environment once). Prints a table and JSON; numbers go to BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

CHILD = r"""
import time, torch
from kleinbild import KleinPipeline
pipe = KleinPipeline.from_pretrained("nano", device="cpu")
prompt = "a small red circle at the top left on a blue background"
pipe.generate(prompt, seed=0)
times = []
for i in range(REPEATS):
    t0 = time.perf_counter(); pipe.generate(prompt, seed=i); times.append(time.perf_counter() - t0)
with pipe._cpu_threads():
    used = torch.get_num_threads()
print(used, sorted(times)[len(times) // 2])
"""


def run(base: dict[str, str], env: dict[str, str], repeats: int) -> tuple[int, float]:
    code = CHILD.replace("REPEATS", str(repeats))
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]), float(out[1])


def main(repeats: int = 15) -> None:
    cores = str(os.cpu_count())
    base = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    settings = {
        f"OMP_NUM_THREADS={cores} (torch's)": {"OMP_NUM_THREADS": cores},
        "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
        f"{cores} threads, WAIT_POLICY=PASSIVE": {"OMP_NUM_THREADS": cores, "OMP_WAIT_POLICY": "PASSIVE"},
        "kleinbild (preset: 1)": {},
    }
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    res: dict[str, dict[str, float]] = {}
    for load in ("idle", "busy"):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
        time.sleep(0.5)
        try:
            for name, env in settings.items():
                threads, med = run(base, env, repeats)
                res.setdefault(name, {})[load] = round(med, 4)
                res[name]["threads"] = threads
        finally:
            if spinner is not None:
                spinner.kill()
    print(f"nano, warm 4-step 128x128, median of {repeats}; CPU: {cpu}, {os.cpu_count()} cores")
    print(f"{'setting':<34} {'threads':>7} {'idle s':>8} {'busy s':>8} {'busy/idle':>9}")
    for name, r in res.items():
        print(f"{name:<34} {r['threads']:>7} {r['idle']:>8.3f} {r['busy']:>8.3f} {r['busy'] / r['idle']:>9.1f}")
    print(json.dumps({"cpu": cpu, "cores": os.cpu_count(), "repeats": repeats, "results": res}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
