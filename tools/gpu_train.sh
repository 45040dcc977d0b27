#!/usr/bin/env bash
# The command that continues the nano recipe on a GPU machine (see tools/gpu_train.py). Needs `.gpu/`
# (run/tokenizer, run/ae/ae.safetensors, init/dit.safetensors, init/text_encoder/model.safetensors: the base EMA in
# float32) copied along, or built on the GPU machine from the bundled weights by tools/gpu_prepare.sh; writes the
# weights, the logs and (unless --eval-n 0) the evaluations to $OUT.
# DECODER_SECONDS > 0 also fine-tunes the autoencoder's decoder, beside the DiT on the same GPU (4 cores).
set -euo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi -L
dec=""
if [ "${DECODER_SECONDS:-0}" != "0" ]; then
  python3 tools/gpu_train.py --decoder-seconds "$DECODER_SECONDS" > /tmp/decoder.out 2>&1 &
  dec=$!
fi
python3 tools/gpu_train.py --batch 256 --lr 3e-4 --base-seconds 260 --distill-seconds 80 \
  --distill-chunks 200 --distill-batch 128 "$@"
if [ -n "$dec" ]; then wait "$dec"; tail -3 /tmp/decoder.out; fi
