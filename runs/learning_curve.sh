#!/usr/bin/env bash
# The learning check: a depth-4 model pretrained for 300 steps on the Wikipedia + Gutenberg train shards must bring
# the held-out Wikipedia bits per byte down at EVERY evaluation (every 25 steps). CPU-sized: about 10-15 minutes on 2
# cores (longer on a busy machine). Prints the curve (step -> bpb) and exits 1 if it ever goes up.
#
#   runs/learning_curve.sh                      # data: $PICOCHAT_DATA_DIR, else ../shared/data next to the repo
#   RUN_DIR=/tmp/lc runs/learning_curve.sh      # another run folder (default $PICOCHAT_HOME/runs/learning_curve)
#
# Re-running continues an interrupted run (--resume) instead of starting over; delete the run folder to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PICOCHAT:-}" ]; then
  if [ -x .venv/bin/picochat ]; then PICOCHAT=.venv/bin/picochat; else PICOCHAT=picochat; fi
fi
DATA="${PICOCHAT_DATA_DIR:-$(pwd)/../shared/data}"
RUN_DIR="${RUN_DIR:-${PICOCHAT_HOME:-$HOME/.cache/picochat}/runs/learning_curve}"
TRAIN=("$DATA"/pretrain/wikipedia_en/shard_*.parquet "$DATA"/pretrain/gutenberg_books/shard_*.parquet)
VAL="$DATA/pretrain/wikipedia_en/val_00000.parquet"

# 1. A tokenizer (vocabulary 32,768) trained on the same train shards, once.
if [ ! -f "$RUN_DIR/tokenizer/tokenizer.json" ]; then
  "$PICOCHAT" tokenizer train --run-dir "$RUN_DIR" "${TRAIN[@]}" --vocab-size 32768
fi

# 2. Pretrain depth 4 (width 256, 2 heads of 128): rows of 256 tokens, 8 rows per step (2,048 tokens), 300 steps
#    (614K tokens). Learning rates, weight decay and schedules follow the depth dial (printed at the start).
#    Validation: 16,384 held-out Wikipedia tokens, the same ones every time.
FLAGS=(--depth 4 --max-seq-len 256 --device-batch-size 8 --total-batch-size 2048 --num-iterations 300
       --eval-every 25 --eval-tokens 16384 --sample-every 100 --save-every 50)
if [ -f "$RUN_DIR/base/state/latest.json" ]; then
  "$PICOCHAT" pretrain --run-dir "$RUN_DIR" --resume
else
  "$PICOCHAT" pretrain --run-dir "$RUN_DIR" "${TRAIN[@]}" --val "$VAL" "${FLAGS[@]}"
fi

# 3. The curve, and the check.
python3 - "$RUN_DIR/base/metrics.jsonl" <<'EOF'
import json, sys

events = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
curve = [(e["step"], e["val_bpb"]) for e in events if e["event"] == "eval"]
train = {e["step"]: e for e in events if e["event"] == "train"}
print("step  val_bpb  train_loss(smoothed)")
for step, bpb in curve:
    loss = train[step]["smooth_loss"] if step in train else float("nan")
    print(f"{step:4d}  {bpb:.4f}   {loss:.4f}")
print(json.dumps({"curve": {step: round(bpb, 4) for step, bpb in curve}}))
rises = [(a, b) for a, b in zip(curve, curve[1:]) if b[1] >= a[1]]
if rises or len(curve) < 2:
    print(f"FAILED: validation bpb did not fall at every evaluation: {rises}", file=sys.stderr)
    sys.exit(1)
print(f"OK: validation bpb fell at every one of {len(curve) - 1} evaluations, {curve[0][1]:.4f} -> {curve[-1][1]:.4f}")
EOF
