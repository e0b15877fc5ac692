#!/usr/bin/env bash
# The main job on a CPU machine. Sets up .venv (once), then runs the pipeline stages that exist so far:
# train a tokenizer on the data folder and print its evaluation.
# Data: $PICOCHAT_DATA_DIR (or pass --data-dir through PICOCHAT_ARGS). Run folder: $PICOCHAT_HOME/runs/${RUN:-cpu}.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/picochat ]; then
  python3 -m venv .venv
  .venv/bin/pip install -e .
fi
RUN="${RUN:-cpu}"
.venv/bin/picochat data list
.venv/bin/picochat tokenizer train --run "$RUN" --vocab-size 32768
.venv/bin/picochat tokenizer eval --run "$RUN"
