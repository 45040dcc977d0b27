#!/usr/bin/env bash
# The device-tool command that continued the nano recipe on a lent GPU (see tools/gpu_train.py). Needs `.gpu/`
# (run/tokenizer, run/ae/ae.safetensors, init/dit.safetensors, init/text_encoder/model.safetensors: the base EMA in
# float32) carried; writes the weights, the log and both evaluations to $OUT.
set -euo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi -L
python3 tools/gpu_train.py --batch 256 --lr 3e-4 --base-seconds 260 --distill-seconds 80 \
  --distill-chunks 200 --distill-batch 128 "$@"
