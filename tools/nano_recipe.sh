#!/usr/bin/env bash
# The recipe of the shipped nano weights, from a clone of the repository: it continues the weights the package
# shipped at commit $START (the round-10 nano, see docs/nano.md) with plain captions in the batches, distils the
# student again from the new base, and evaluates both models at n=100. Every stage resumes from its checkpoint, so
# an interrupted run is continued by running the same command again. BUNDLE=1 copies the result into
# src/kleinbild/weights/nano.
#
#   bash tools/nano_recipe.sh [RUN]        (default RUN: runs/nano-recipe; 57 min of training and 19 min of
#                                           evaluation on 2 CPU cores, docs/nano.md#the-recipe)
set -euo pipefail
RUN=${1:-runs/nano-recipe}
START=${START:-23361ee}
THREADS=${THREADS:-2}
export OMP_NUM_THREADS=$THREADS
W=src/kleinbild/weights/nano

take() {  # take PATH_IN_REPO DEST: a file as the package shipped it at $START
  [ -f "$2" ] || { mkdir -p "$(dirname "$2")"; git show "$START:$W/$1" > "$2.part" && mv "$2.part" "$2"; }
}
for f in tokenizer.json tokenizer_config.json; do take "text_encoder/$f" "$RUN/tokenizer/$f"; done
take ae.safetensors "$RUN/ae/ae.safetensors"
take flux-2-nano-base.safetensors "$RUN/init/dit.safetensors"
for f in config.json model.safetensors tokenizer.json tokenizer_config.json; do
  take "text_encoder/$f" "$RUN/init/text_encoder/$f"
done
take flux-2-nano.safetensors "$RUN/student-init.safetensors"

# The base, from the round-10 one: 1500 steps x 32 at a low learning rate (batch 32 on the CPU is an eighth of the
# GPU rounds' batch, so their 3e-4 would shake it), with plain captions in 20% of the batches and edits in 40%.
kleinbild train base --run "$RUN" --init "$RUN/init" --steps 1500 --lr 6e-5 --mix 0.2,0.4,0.15,0.05,0,0.2
# The student, from the round-10 one: 100 x 32 new teacher trajectories (plain ones solved with 4 teacher steps per
# student step), 600 steps at lr 5e-5.
kleinbild train distill --run "$RUN" --init "$RUN/student-init.safetensors" --seed 11 --chunks 100 --steps 600 \
  --lr 5e-5 --mix 0.2,0.45,0.15,0.05,0,0.15 --plain-substeps 4
if [ "${BUNDLE:-0}" = 1 ]; then kleinbild train bundle --run "$RUN"; fi

ev() {  # ev PRESET DIT STEPS NAME [EVAL FLAGS]: the table, then one line of JSON, kept in $RUN/eval-NAME.txt
  [ -s "$RUN/eval-$4.txt" ] || kleinbild eval --preset "$1" -m "$2" --vae "$RUN/ae/ae.safetensors" \
    --text-encoder "$RUN/base/text_encoder" --n 100 --steps "$3" --json "${@:5}" > "$RUN/eval-$4.txt.part"
  [ -s "$RUN/eval-$4.txt" ] || mv "$RUN/eval-$4.txt.part" "$RUN/eval-$4.txt"
  grep -v '^{' "$RUN/eval-$4.txt"
}
ev nano "$RUN/distill/dit.safetensors" 4 nano
ev nano-base "$RUN/base/dit.safetensors" 50 nano-base
# The model alone on plain prompts (the evaluations above complete them, as generate does).
ev nano "$RUN/distill/dit.safetensors" 4 nano-literal --tasks plain,plain_double --literal-prompt
ev nano-base "$RUN/base/dit.safetensors" 50 nano-base-literal --tasks plain,plain_double --literal-prompt
