#!/usr/bin/env bash
# The GPT-2-grade reference recipe on one node of 8 GPUs (REFERENCE.md E.1 run 6): depth 24, tokens = 8 x scaling
# parameters, 1M-token steps of 16 rows x 2,048 tokens per GPU -> 5,568 steps, 5.84B tokens, 2.8e19 FLOPs. Then the
# base evaluation (bpb, CORE), SFT, the chat evaluation and the report card, all in $PICOCHAT_HOME/runs/$RUN.
#
#   bash runs/speedrun.sh                    # 8 GPUs
#   NPROC=1 bash runs/speedrun.sh            # the single-GPU variant: the same steps (8x the gradient accumulation)
#   bash runs/speedrun.sh --rl               # extra flags go to `picochat run` (here: RL on GSM8K at the end)
#   bash runs/speedrun.sh --dry-run          # the plan and the time estimate, without running
#
# Data: the first 8 ClimbMix shards are downloaded before the tokenizer trains on them (2B characters); the rest (170
# in all, ~7B tokens) download in the background meanwhile. Needs ~20 GB of disk for the shards.
#
# Expected time and cost (estimates: this recipe was not run on GPUs by us yet; `--dry-run` prints them):
#   8 x H100:  pretraining ~2.0 h at 50% bf16 MFU (the reference, with FP8, measured 1.65 h), plus ~20-30 min for
#              evaluation and SFT; ~$60 at $3 per GPU-hour.
#   1 x H100:  ~16 h of pretraining (~$50); 1 x H200 a little faster.
# Interrupted? Run the same command again: finished stages are skipped and training resumes exactly (on the same or
# a different number of GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
if [ ! -x .venv/bin/picochat ]; then
  python3 -m venv .venv
  # A CUDA build of the pinned torch first (see README "Installing on a GPU machine"), then picochat.
  .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130
  .venv/bin/pip install -e . -c constraints.txt   # the dependency versions the tests passed with
fi
RUN="${RUN:-speedrun}"
NPROC="${NPROC:-8}"
.venv/bin/picochat run --preset speedrun --run "$RUN" --nproc-per-node "$NPROC" "$@"
