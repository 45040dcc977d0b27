#!/usr/bin/env bash
# The GPU measurement, run on a GPU machine from the repository root (see BENCHMARKS.md):
#   carry .whl (diffusers 0.42.1 + importlib_metadata wheels, pip download'ed here), results under $OUT.
# PARTS picks what runs (default all): engines (eager and compiled vs diffusers), memory, speed (recompiles across
# sizes, static vs dynamic graphs, the eager forms against the ones they replaced, FP8 vs bf16, step caching on
# klein-base-4b, per-op profiles of both engines, and the kernels and bytes counted per block).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
PARTS=${PARTS:-engines,memory,speed}
if [[ $PARTS == *engines* ]]; then
python3 -m kleinbild.cli bench --preset "${PRESET:-klein-4b}" --random-weights --device cuda --size "${SIZE:-1024}" \
  --steps 4 --repeats "${REPEATS:-5}" --vs diffusers --compile 2>&1 | tee "$OUT/bench.log"
tail -1 "$OUT/bench.log" > "$OUT/bench.json"
fi
if [[ $PARTS == *memory* ]]; then
# Peak VRAM of each format and offload mode beside the computed plan (needs the gguf wheel in .whl as well).
python3 -m kleinbild.cli bench --memory --preset "${PRESET:-klein-4b}" --device cuda --size "${SIZE:-1024}" \
  --steps 1 2>&1 | tee "$OUT/memory.log"
tail -1 "$OUT/memory.log" > "$OUT/memory.json"
python3 -m kleinbild.cli bench --memory --dequant --device cuda 2>&1 | tee "$OUT/dequant.json"
fi
if [[ $PARTS == *speed* ]]; then
# The eager GPU path's kernels and bytes beside diffusers' (counted on the meta device: seconds, no GPU work).
python3 -m kleinbild.bench.traffic --preset "${PRESET:-klein-4b}" --size "${SIZE:-1024}" > "$OUT/traffic.json"
python3 -m kleinbild.bench.speed --device cuda --preset "${PRESET:-klein-4b}" --size "${SIZE:-1024}" --vs \
  --out "$OUT/speed" 2>&1 | tee "$OUT/speed.log"
fi
