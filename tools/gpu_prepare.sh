#!/usr/bin/env bash
# Build the `.gpu/` folder that tools/gpu_train.py reads, from the package's bundled nano files (the source tree
# copied to the GPU machine must stay under 64 MiB, so the folder is built there rather than copied a second time):
#   run/ae, run/tokenizer   the run folder (autoencoder, tokenizer)
#   init/                   the base to continue (or, with --base-seconds 0, the teacher): dit + text encoder
#   student.safetensors     the shipped 4-step student, for --student-init
# Usage: bash tools/gpu_prepare.sh [DEST]   (DEST defaults to .gpu; run from the repository root)
set -euo pipefail
dest=${1:-.gpu}
w=src/kleinbild/weights/nano
mkdir -p "$dest/run/ae" "$dest/run/tokenizer" "$dest/init/text_encoder"
cp "$w/ae.safetensors" "$dest/run/ae/"
cp "$w"/text_encoder/tokenizer*.json "$dest/run/tokenizer/"
cp "$w/flux-2-nano-base.safetensors" "$dest/init/dit.safetensors"
cp "$w/text_encoder/model.safetensors" "$dest/init/text_encoder/"
cp "$w/flux-2-nano.safetensors" "$dest/student.safetensors"
