#!/usr/bin/env bash
# The price of portability: validation bits per byte of the reference and the portable architecture at equal steps,
# at the `cpu` preset's shape (depth 4, 512-token rows, 4,096-token steps, vocabulary 8,192), for each seed. Each
# architecture gets its own tokenizer, as `picochat run` gives it (picochat's split / llama.cpp's llama-bpe split);
# bits per byte do not depend on the tokenizer, so the numbers compare. Prints one line per run at the end.
#
#   runs/portability.sh                            # 400 steps (the preset's), seeds 42 and 43
#   STEPS=50 SEEDS="42 43 44" runs/portability.sh  # shorter runs, more seeds
#   ROOT=/tmp/port runs/portability.sh             # another folder (default $PICOCHAT_HOME/runs/portability)
#
# Finished runs are skipped when it is run again; delete ROOT to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PICOCHAT:-}" ]; then
  if [ -x .venv/bin/picochat ]; then PICOCHAT=.venv/bin/picochat; else PICOCHAT=picochat; fi
fi
STEPS="${STEPS:-400}"
SEEDS="${SEEDS:-42 43}"
ROOT="${ROOT:-${PICOCHAT_HOME:-$HOME/.cache/picochat}/runs/portability}"

for split in picochat llama-bpe; do
  if [ ! -f "$ROOT/tokenizer-$split/tokenizer/tokenizer.json" ]; then
    "$PICOCHAT" tokenizer train --run-dir "$ROOT/tokenizer-$split" --vocab-size 8192 --max-chars 200000000 \
      --split-pattern "$split"
  fi
done
for seed in $SEEDS; do
  for arch in reference portable; do
    run="$ROOT/$arch-s$seed-n$STEPS"
    grep -qs "\"event\": \"eval\", \"step\": $STEPS," "$run/base/metrics.jsonl" && continue  # finished
    if [ -f "$run/base/state/latest.json" ]; then  # interrupted: continue exactly
      "$PICOCHAT" pretrain --run-dir "$run" --resume
      continue
    fi
    split=picochat; [ "$arch" = portable ] && split=llama-bpe
    mkdir -p "$run" && rm -rf "$run/tokenizer" && cp -r "$ROOT/tokenizer-$split/tokenizer" "$run/"
    "$PICOCHAT" pretrain --run-dir "$run" --architecture "$arch" --seed "$seed" --depth 4 --max-seq-len 512 \
      --device-batch-size 8 --total-batch-size 4096 --num-iterations "$STEPS" --eval-every 25 --eval-tokens 32768 \
      --save-every 50 --sample-every 0
  done
done
for metrics in "$ROOT"/*-s*-n"$STEPS"/base/metrics.jsonl; do
  python3 - "$metrics" <<'EOF'
import json, sys
evals = [json.loads(line) for line in open(sys.argv[1]) if '"eval"' in line]
print(sys.argv[1].split("/")[-3], " ".join(f"{e['step']}:{e['val_bpb']:.4f}" for e in evals))
EOF
done
