"""`picochat run`: presets, flags, the dry-run plan, a whole tiny pipeline on real data, and resuming after kill -9.

The tiny pipeline trains a 2-layer model on one Wikipedia shard; every stage is the real command in its own process.
An interrupted copy of it is killed (SIGKILL to the whole process group: the pipeline and its stage child, as a
power cut would) during pretraining and during SFT, then re-run: it must end with the same weights and the same
evaluation results as the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from picochat.cli import main
from picochat.planning import pretraining_plan
from picochat.presets import PRESETS

TINY_FLAGS = [
    "--vocab-size", "512", "--tokenizer-max-chars", "300000",
    "--depth", "2", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "256",
    "--num-iterations", "40", "--eval-every", "20", "--eval-tokens", "1024", "--save-every", "5",
    "--bpb-tokens", "2048", "--core-max-per-task", "2",
    "--sft-mix", "identity:0.3,gsm8k:0.003", "--sft-num-iterations", "16", "--sft-device-batch-size", "4",
    "--chat-eval-tasks", "GSM8K,spelling", "--chat-eval-max-problems", "2", "--chat-eval-max-new-tokens", "8",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, data_dir) -> Path:
    """A data folder with one Wikipedia train shard and its validation shard, plus the task data (linked)."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "pretrain" / "wikipedia_en").mkdir(parents=True)
    for name in ("shard_00000.parquet", "val_00000.parquet"):
        (folder / "pretrain" / "wikipedia_en" / name).symlink_to(data_dir / "pretrain" / "wikipedia_en" / name)
    for name in ("chat_eval", "core_eval", "identity", "sft", "tokenizers", "words"):
        if (data_dir / name).exists():
            (folder / name).symlink_to(data_dir / name)
    return folder


def pipeline_command(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "picochat", "run", "--preset", "cpu", "--run-dir", str(run_dir),
            "--data-dir", str(data), *TINY_FLAGS, *extra]  # fmt: skip


def child_env() -> dict[str, str]:
    return {**os.environ, "PICOCHAT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def run_pipeline(run_dir: Path, data: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(pipeline_command(run_dir, data, *extra), env=child_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def results(run_dir: Path) -> dict:
    """Everything that must not depend on interruptions: final weights and every evaluation's metrics."""
    out = {}
    for stage in ("base", "sft"):
        weights = load_file(str(run_dir / stage / "model.safetensors"))
        out[f"{stage}_weights"] = {name: tensor.double().sum().item() for name, tensor in weights.items()}
        out[f"{stage}_step"] = json.loads((run_dir / stage / "state" / "latest.json").read_text())["step"]
    for path in sorted((run_dir / "eval").glob("*.json")):
        if path.name != "tokenizer.json":
            out[path.name] = json.loads(path.read_text())["metrics"]
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, small_data) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    done = run_pipeline(run_dir, small_data)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


# ----------------------------------------------------------------------------------------------------------
# Presets and the plan


def test_speedrun_plan_matches_the_reference_run_6():
    """REFERENCE E.1 run 6: depth 24, ratio 8, 16 rows per GPU on 8 GPUs, 1M-token steps, 5,568 steps."""
    plan = pretraining_plan(PRESETS["speedrun"])
    assert plan["model_config"]["n_layer"] == 24
    assert plan["total_batch_size"] == 1_048_576
    assert plan["num_iterations"] == 5_568
    assert plan["training_tokens"] == 5_568 * 1_048_576
    assert plan["gradient_accumulation"] == 4  # 8 GPUs x 16 rows x 2,048 tokens x 4 = 1M


def test_dry_run_prints_settings_and_plan_without_running(tmp_path, capsys):
    run_dir = tmp_path / "speed"
    assert main(["run", "--preset", "speedrun", "--run-dir", str(run_dir), "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "depth 24, width 1536" in out.out
    assert "1,048,576 tokens per step = 8 processes x 16 rows x 2048 tokens x 4 accumulation" in out.out
    assert "5,568 (--target-param-data-ratio)" in out.out
    assert "torchrun --standalone --nproc_per_node=8 -m picochat pretrain" in out.out
    assert "pretraining time" in out.out and "on 8 x H100" in out.out
    assert "nproc_per_node" in out.err  # the settings table (logged)
    assert not run_dir.exists()


def test_flags_override_the_preset_and_bad_values_are_usage_errors(tmp_path, capsys):
    assert main(["run", "--preset", "cpu", "--run-dir", str(tmp_path / "r"), "--depth", "6", "--rl",
                 "--total-batch-size", "auto", "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr()
    assert "depth 6, width 384" in out.out
    assert " rl " in out.out and "picochat rl " in out.out  # RL and its evaluation are planned
    assert "(--num-iterations)" in out.out
    for bad in (["--depth", "0"], ["--depth", "four"], ["--vocab-size", "12"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["run", "--dry-run", *bad])
        assert exit_info.value.code == 2
        assert "expected" in capsys.readouterr().err
    assert main(["run", "--dry-run", "--download-shards", "2", "--tokenizer-shards", "4"]) == 2
    assert "--tokenizer-shards 4 is more than --download-shards 2" in capsys.readouterr().err


def test_missing_data_folder_is_one_line(tmp_path, capsys):
    assert main(["run", "--run-dir", str(tmp_path / "r"), "--data-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("picochat: error: data folder") and "Traceback" not in "".join(err)


# ----------------------------------------------------------------------------------------------------------
# A whole pipeline


def test_the_whole_pipeline_runs_every_stage(finished_run):
    state = json.loads((finished_run / "pipeline.json").read_text())
    stages = ["data", "tokenizer", "tokenizer-eval", "pretrain", "base-bpb", "base-core", "sft", "sft-eval", "report"]
    assert list(state["stages"]) == stages
    assert all(state["stages"][name]["status"] == "complete" for name in stages)
    assert all(state["stages"][name]["seconds"] > 0 for name in stages)
    evals = {path.name.rsplit("_", 1)[0] for path in (finished_run / "eval").glob("*.json")}
    assert {"bpb_base", "core_base", "chat_sft", "tokenizer.json"} <= evals | {"tokenizer.json"}
    report = (finished_run / "report.md").read_text()
    for section in ("## Summary", "## Pipeline", "## Training curves", "## Tokenizer", "| pretrain | complete |"):
        assert section in report
    assert "CORE-18" in report


def test_a_second_run_skips_everything_done(finished_run, small_data):
    before = results(finished_run)
    again = run_pipeline(finished_run, small_data)
    assert again.returncode == 0, again.stderr[-2000:]
    for name in ("data", "tokenizer", "pretrain", "base-bpb", "base-core", "sft", "sft-eval"):
        assert f"[{name}] complete, skipped" in again.stderr
    assert "Talk to your model" in again.stdout and "picochat chat --run-dir" in again.stdout
    assert results(finished_run) == before


def test_a_changed_setting_is_refused(finished_run, small_data):
    changed = run_pipeline(finished_run, small_data, "--depth", "3")
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines()[-1] == (
        f"picochat: error: {finished_run.resolve()} was started with --depth 2, not 3: run again with the same "
        "value, or use another --run"
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the pipeline ended before the moment the test kills it"
        assert time.monotonic() < deadline, "timed out waiting for the pipeline"
        time.sleep(0.02)


def latest(run_dir: Path, stage: str) -> int:
    pointer = run_dir / stage / "state" / "latest.json"
    try:
        return json.loads(pointer.read_text())["step"]
    except (OSError, ValueError):
        return -1


def test_killed_twice_with_sigkill_it_resumes_to_the_same_results(finished_run, small_data, tmp_path):
    run_dir = tmp_path / "interrupted"
    for moment in (lambda: latest(run_dir, "base") >= 10, lambda: latest(run_dir, "sft") >= 5):
        process = subprocess.Popen(pipeline_command(run_dir, small_data), env=child_env(), start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_for(moment, process)
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # the pipeline and its stage child, at once
            process.wait()
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert state["stages"]["sft"].get("status") != "complete"
    done = run_pipeline(run_dir, small_data)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    assert results(run_dir) == results(finished_run)
