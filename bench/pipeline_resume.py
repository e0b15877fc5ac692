"""Benchmark: `picochat run` killed at random moments ends with the same results as an uninterrupted run.

Two copies of one small pipeline (the cpu preset shrunk: 60 pretraining steps, 24 SFT steps, small evaluations):

  1. uninterrupted, timed;
  2. interrupted --kills times with SIGKILL to the whole process group (the pipeline and its stage child at once, as
     a power cut would), then re-run with the same command until it completes. The first kill lands while a
     checkpoint is being written (the moment a state/step_*.tmp-* folder exists), the others at random moments
     (seeded): kill k within the first 1/2^(k-1) of the uninterrupted run's duration, since each re-run has less
     left to do. A kill that comes after the pipeline already completed is reported as "completed".

Then every result is compared: final weights of base/ and sft/ (bit for bit), every evaluation's metrics, and the
final steps. Prints a table, then one JSON line with "equal": true/false.

    python bench/pipeline_resume.py                        # ~10 minutes on 2 CPU cores
    python bench/pipeline_resume.py --kills 5 --seed 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parent.parent
FLAGS = [
    "--num-iterations", "60", "--save-every", "10", "--eval-every", "20", "--eval-tokens", "8192",
    "--bpb-tokens", "16384", "--core-max-per-task", "4", "--sft-num-iterations", "24",
    "--chat-eval-tasks", "GSM8K,spelling", "--chat-eval-max-problems", "4", "--chat-eval-max-new-tokens", "16",
]  # fmt: skip


def command(run_dir: Path, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "picochat", "run", "--preset", "cpu", "--run-dir", str(run_dir),
            "--data-dir", str(data_dir), *FLAGS]  # fmt: skip


def environment() -> dict[str, str]:
    return {**os.environ, "PICOCHAT_NO_PROGRESS": "1"}


def results(run_dir: Path) -> dict:
    out: dict = {}
    for stage in ("base", "sft"):
        weights = load_file(str(run_dir / stage / "model.safetensors"))
        out[f"{stage}_weights_sha256"] = {name: hashlib.sha256(tensor.numpy().tobytes()).hexdigest()
                                          for name, tensor in sorted(weights.items())}  # fmt: skip
        out[f"{stage}_step"] = json.loads((run_dir / stage / "state" / "latest.json").read_text())["step"]
    for path in sorted((run_dir / "eval").glob("*.json")):
        if path.name != "tokenizer.json":
            out[path.name] = json.loads(path.read_text())["metrics"]
    return out


def checkpoint_being_written(run_dir: Path) -> bool:
    return any(run_dir.glob("*/state/step_*.tmp-*"))


def run_until(run_dir: Path, data_dir: Path, moment, timeout: float) -> tuple[str, float]:
    """Start the pipeline; SIGKILL its process group when moment() is true. Returns (what happened, seconds)."""
    started = time.monotonic()
    process = subprocess.Popen(command(run_dir, data_dir), env=environment(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while process.poll() is None:
            if moment(time.monotonic() - started):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return "killed", time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise SystemExit(f"the pipeline took over {timeout} s")
            time.sleep(0.002)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return ("completed" if process.returncode == 0 else f"exit {process.returncode}"), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    shared = REPO_ROOT.parent / "shared" / "data"
    parser.add_argument("--data-dir", default=os.environ.get("PICOCHAT_DATA_DIR") or shared)
    parser.add_argument("--keep", action="store_true", help="keep the two run folders")
    args = parser.parse_args()
    data_dir = Path(args.data_dir).resolve()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="picochat_resume_"))

    outcome, uninterrupted_seconds = run_until(work / "uninterrupted", data_dir, lambda t: False, 7200)
    if outcome != "completed":
        raise SystemExit(f"the uninterrupted pipeline did not complete ({outcome})")
    print(f"uninterrupted: {uninterrupted_seconds:.1f} s", flush=True)

    interrupted = work / "interrupted"
    attempts = []
    for kill in range(args.kills):
        if kill == 0:
            moment, planned = (lambda t: checkpoint_being_written(interrupted)), "during a checkpoint write"
        else:
            # Each attempt starts over from process start-up but has less left to do: aim within the first half,
            # then the first quarter, ... of an uninterrupted run (at least 3 s in).
            at = rng.uniform(3.0, max(4.0, uninterrupted_seconds / 2**kill))
            moment, planned = (lambda t, at=at: t >= at), f"after {at:.1f} s"
        outcome, seconds = run_until(interrupted, data_dir, moment, 7200)
        state_file = interrupted / "pipeline.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        running = [name for name, info in state.get("stages", {}).items() if info.get("status") != "complete"]
        attempts.append({"kill": kill + 1, "planned": planned, "outcome": outcome, "seconds": round(seconds, 1),
                         "stage": running[0] if running else "-"})  # fmt: skip
        print(f"kill {kill + 1}: {planned}: {outcome} after {seconds:.1f} s in stage {attempts[-1]['stage']}",
              flush=True)  # fmt: skip
    outcome, seconds = run_until(interrupted, data_dir, lambda t: False, 7200)
    attempts.append({"kill": "-", "planned": "final re-run", "outcome": outcome, "seconds": round(seconds, 1)})
    equal = outcome == "completed" and results(interrupted) == results(work / "uninterrupted")
    for row in attempts:
        print(f"  {row}")
    print(json.dumps({"uninterrupted_seconds": round(uninterrupted_seconds, 1), "attempts": attempts,
                      "final": outcome, "equal": equal, "work": str(work) if args.keep else None}))  # fmt: skip
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if equal else 1)


if __name__ == "__main__":
    main()
