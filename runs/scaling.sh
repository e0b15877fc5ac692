#!/usr/bin/env bash
# Scaling sweep: pretrain every depth in $DEPTHS at every FLOPs budget in $BUDGETS (the number of steps follows from
# the budget: steps = FLOPs / (FLOPs per token x tokens per step)), evaluate each model's CORE, then print one
# table (depth, FLOPs, parameters, tokens, final validation bpb, CORE) and write it as JSON. For each budget the
# depth with the lowest bpb is the compute-optimal one; plotted against the budget it gives the scaling law.
#
#   bash runs/scaling.sh                                     # 8 GPUs, depths 8-16, budgets 1e18 3e18 1e19
#   NPROC=1 DEPTHS="10 12" BUDGETS="2e17 6e17" bash runs/scaling.sh
#   DEPTHS="2 3" BUDGETS="2e12 6e12" NPROC=1 EXTRA="--max-seq-len 256 --device-batch-size 8 --total-batch-size 2048" \
#     CORE_MAX=20 EVAL_TOKENS=65536 bash runs/scaling.sh      # a toy sweep that runs on a CPU in ~10 minutes
#
# Each point is its own run folder under $SWEEP_DIR (default $PICOCHAT_HOME/runs/scaling), sharing one tokenizer;
# re-running skips finished points and resumes an interrupted one. Data: $PICOCHAT_DATA_DIR (download shards first
# with `picochat data download --num-shards 40` or `picochat run --preset d12`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PICOCHAT:-}" ]; then
  if [ -x .venv/bin/picochat ]; then PICOCHAT=.venv/bin/picochat; else PICOCHAT=picochat; fi
fi
DEPTHS="${DEPTHS:-8 10 12 14 16}"
BUDGETS="${BUDGETS:-1e18 3e18 1e19}"
NPROC="${NPROC:-8}"
EXTRA="${EXTRA:-}"
CORE_MAX="${CORE_MAX:-}"
EVAL_TOKENS="${EVAL_TOKENS:-10485760}"   # validation tokens for each point's final bpb (20 x 524,288)
SWEEP_DIR="${SWEEP_DIR:-${PICOCHAT_HOME:-$HOME/.cache/picochat}/runs/scaling}"
PY="$(dirname "$(command -v "$PICOCHAT")")/python"; [ -x "$PY" ] || PY=python3
export OMP_NUM_THREADS=1

launch() {  # a stage on NPROC processes (torchrun) or in this one
  if [ "$NPROC" -gt 1 ]; then "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m picochat "$@"
  else "$PICOCHAT" "$@"; fi
}

mkdir -p "$SWEEP_DIR"
if [ ! -f "$SWEEP_DIR/tokenizer/config.json" ]; then
  "$PICOCHAT" tokenizer train --run-dir "$SWEEP_DIR"
fi
for depth in $DEPTHS; do
  for budget in $BUDGETS; do
    point="$SWEEP_DIR/d${depth}_f${budget}"
    mkdir -p "$point"
    [ -e "$point/tokenizer" ] || ln -s "$SWEEP_DIR/tokenizer" "$point/tokenizer"
    if [ -f "$point/base/state/latest.json" ]; then
      launch pretrain --run-dir "$point" --resume
    else
      # shellcheck disable=SC2086
      launch pretrain --run-dir "$point" --depth "$depth" --target-flops "$budget" --eval-every 0 \
        --eval-tokens "$EVAL_TOKENS" $EXTRA
    fi
    if ! ls "$point"/eval/core_base_*.json >/dev/null 2>&1; then
      launch eval core --run-dir "$point" --stage base ${CORE_MAX:+--max-per-task "$CORE_MAX"}
    fi
  done
done

"$PY" - "$SWEEP_DIR" <<'PYEOF'
import json, sys
from pathlib import Path

sweep = Path(sys.argv[1])
rows = []
for point in sorted(sweep.glob("d*_f*")):
    config = json.loads((point / "base" / "config.json").read_text())
    events = [json.loads(line) for line in (point / "base" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    bpb = [e["val_bpb"] for e in events if e.get("event") == "eval"]
    core = sorted(point.glob("eval/core_base_*.json"))
    derived = config.get("derived", {})
    rows.append({"point": point.name, "depth": config["model"]["n_layer"],
                 "flops": derived.get("training_flops"), "scaling_params": derived.get("scaling_params"),
                 "tokens": derived.get("training_tokens"), "val_bpb": bpb[-1] if bpb else None,
                 "core": json.loads(core[-1].read_text())["metrics"].get("CORE") if core else None})
print(f"{'point':<16}{'depth':>6}{'FLOPs':>11}{'params':>14}{'tokens':>15}{'val bpb':>9}{'CORE':>8}")
for r in rows:
    cells = [f"{r['point']:<16}", f"{r['depth']:>6}", f"{r['flops'] or 0:>11.2e}", f"{r['scaling_params'] or 0:>14,}",
             f"{r['tokens'] or 0:>15,}", f"{r['val_bpb'] or float('nan'):>9.4f}", f"{r['core'] or float('nan'):>8.4f}"]
    print("".join(cells))
(sweep / "scaling.json").write_text(json.dumps(rows, indent=1))
print(json.dumps({"points": len(rows), "table": str(sweep / "scaling.json")}))
PYEOF
