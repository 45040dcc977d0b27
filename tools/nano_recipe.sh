#!/usr/bin/env bash
# The recipe of the shipped nano weights, from a clone of the repository: it continues the weights the package
# shipped at commit $START (the round-10 nano, see docs/nano.md) on plain captions, distils the student again, and
# evaluates both models at n=100. Every stage resumes from its checkpoint, so an interrupted run is continued by
# running the same command again. BUNDLE=1 copies the result into src/kleinbild/weights/nano.
#
#   bash tools/nano_recipe.sh [RUN]        (default RUN: runs/nano-plain; 1.5 h of training and 0.4 h of
#                                           evaluation on 2 CPU cores, docs/nano.md)
set -euo pipefail
RUN=${1:-runs/nano-plain}
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

# The base: 2000 steps x 32 with plain captions in 35% of the batches.
kleinbild train base --run "$RUN" --init "$RUN/init" --steps 2000 --lr 2e-4 --mix 0.25,0.2,0.1,0.05,0.05,0.35
# The student, from the shipped one: 100 x 32 new teacher trajectories (plain ones solved with 4 teacher steps per
# student step), 700 steps.
kleinbild train distill --run "$RUN" --init "$RUN/student-init.safetensors" --seed 11 --chunks 100 --steps 700 \
  --mix 0.25,0.35,0.1,0.05,0,0.25 --plain-substeps 4

# Polish: the plain stage cost edits (base 0.73 -> 0.62), so both models continue on edit-heavy batches at a low
# learning rate, in $RUN/polish (same tokenizer and autoencoder).
P=$RUN/polish
mkdir -p "$P"
for d in tokenizer ae; do [ -e "$P/$d" ] || ln -s "$(cd "$RUN/$d" && pwd)" "$P/$d"; done
kleinbild train base --run "$P" --init "$RUN/base" --steps 800 --lr 5e-5 --mix 0.2,0.4,0.1,0.05,0,0.25
kleinbild train distill --run "$P" --init "$RUN/distill/dit.safetensors" --seed 12 --chunks 100 --steps 500 \
  --mix 0.2,0.45,0.1,0.05,0,0.2 --plain-substeps 4
if [ "${BUNDLE:-0}" = 1 ]; then kleinbild train bundle --run "$P"; fi

ev() {  # ev PRESET DIT STEPS NAME [EVAL FLAGS]: the table, then one line of JSON, kept in $P/eval-NAME.txt
  [ -s "$P/eval-$4.txt" ] || kleinbild eval --preset "$1" -m "$2" --vae "$RUN/ae/ae.safetensors" \
    --text-encoder "$P/base/text_encoder" --n 100 --steps "$3" --json "${@:5}" > "$P/eval-$4.txt.part"
  [ -s "$P/eval-$4.txt" ] || mv "$P/eval-$4.txt.part" "$P/eval-$4.txt"
  grep -v '^{' "$P/eval-$4.txt"
}
ev nano "$P/distill/dit.safetensors" 4 nano
ev nano-base "$P/base/dit.safetensors" 50 nano-base
# The model alone on plain prompts (the evaluations above complete them, as generate does).
ev nano "$P/distill/dit.safetensors" 4 nano-literal --tasks plain,plain_double --literal-prompt
ev nano-base "$P/base/dit.safetensors" 50 nano-base-literal --tasks plain,plain_double --literal-prompt
