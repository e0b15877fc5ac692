#!/usr/bin/env bash
# The main job on a CPU machine: sets up .venv (once), then runs the whole pipeline with the `cpu` preset
# (data check -> tokenizer -> pretrain -> base eval -> SFT -> chat eval -> report, about 20 minutes on 2 quiet cores),
# and finally asks the model its name.
#
#   PICOCHAT_DATA_DIR=../shared/data bash runs/cpu.sh       # data from that folder
#   RUN=mine bash runs/cpu.sh --depth 6                     # another run name; extra flags go to `picochat run`
#
# Interrupted? Run the same command again: finished stages are skipped and training resumes exactly.
# The run folder is $PICOCHAT_HOME/runs/$RUN (default ~/.cache/picochat/runs/cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/picochat ]; then
  python3 -m venv .venv
  .venv/bin/pip install -e . -c constraints.txt   # the dependency versions the tests passed with
fi
RUN="${RUN:-cpu}"
.venv/bin/picochat run --preset cpu --run "$RUN" "$@"
.venv/bin/picochat chat --run "$RUN" -p "What is your name?"
