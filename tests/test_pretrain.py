"""`picochat pretrain` end to end on a tiny model and a slice of real Wikipedia: ranks (torchrun, gloo), exact resume
after kill -9 and across rank layouts, SIGTERM, the files it writes, the depth dial, and flag errors."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, new_run, wiki_args
from safetensors.torch import load_file

from picochat.cli import main
from picochat.stages.pretrain import DEFAULTS, derive_plan
from picochat.trainer import read_metrics

# Tiny models run faster on one thread (no OpenMP barriers on a busy machine), like the subprocesses below.
pytestmark = pytest.mark.usefixtures("one_thread")


def subprocess_env() -> dict[str, str]:
    # One thread per process: two ranks share the 2 cores, and every run computes with the same thread count.
    return {**os.environ, "PICOCHAT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def run_subprocess(args: list[str], ranks: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m picochat pretrain ...`, or the same under torchrun (gloo) with `ranks` processes."""
    launcher = [sys.executable]
    if ranks:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = [*launcher, "-m", "picochat", "pretrain", *args, "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def train_losses(run_dir: Path) -> list[float]:
    return [event["loss"] for event in read_metrics(run_dir / "base") if event["event"] == "train"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "base" / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tolerance: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= tolerance * max(a[name].abs().max(), 1e-12), name


# ---- ranks and resume across rank layouts -------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_and_two_rank_runs(tmp_path_factory, tokenizer_dir, data_dir):
    """The same 6 steps twice: 1 rank x 2 micro-steps (in this process) and 2 ranks x 1 (torchrun, gloo).
    Checkpoints at steps 3 and 6."""
    root = tmp_path_factory.mktemp("ranks")
    args = [*wiki_args(data_dir), *TINY, "--num-iterations", "6", "--eval-every", "3", "--save-every", "3",
            "--keep-checkpoints", "5"]  # fmt: skip
    one = new_run(root / "one", tokenizer_dir)
    assert main(["pretrain", "--run-dir", str(one), *args, "--device", "cpu"]) == 0
    two = new_run(root / "two", tokenizer_dir)
    # `python -m picochat` under torchrun, as a user would launch it.
    run_subprocess(["--run-dir", str(two), *args], ranks=2)
    return one, two


def test_two_ranks_equal_one_rank_with_twice_the_accumulation(one_and_two_rank_runs):
    one, two = one_and_two_rank_runs
    config = json.loads((two / "base" / "config.json").read_text())
    assert config["derived"]["world_size"] == 2 and config["derived"]["gradient_accumulation"] == 1
    assert json.loads((one / "base" / "config.json").read_text())["derived"]["gradient_accumulation"] == 2
    losses_one, losses_two = train_losses(one), train_losses(two)
    assert len(losses_one) == len(losses_two) == 6
    for a, b in zip(losses_one, losses_two):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert losses_one[-1] < losses_one[0]  # it did train
    assert_same_weights(final_weights(one), final_weights(two), 1e-5)
    bpb = lambda run: [e["val_bpb"] for e in read_metrics(run / "base") if e["event"] == "eval"]  # noqa: E731
    assert bpb(one) == pytest.approx(bpb(two), rel=1e-6) and len(bpb(one)) == 3  # steps 0, 3, 6


def test_two_rank_checkpoint_resumes_on_one_rank(one_and_two_rank_runs, tmp_path):
    one, two = one_and_two_rank_runs
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    # Only --resume and the folder: every other flag comes from the run's config.json.
    assert main(["pretrain", "--run-dir", str(resumed), "--resume", "3", "--device", "cpu"]) == 0
    assert json.loads((resumed / "base" / "config.json").read_text())["provenance"]["resumed_from_step"] == 3
    assert_same_weights(final_weights(resumed), final_weights(one), 1e-5)
    assert train_losses(resumed) == pytest.approx(train_losses(one), rel=1e-5)


def test_one_rank_checkpoint_resumes_on_two_ranks(one_and_two_rank_runs, tmp_path):
    one, _ = one_and_two_rank_runs
    resumed = tmp_path / "resumed"
    shutil.copytree(one, resumed)
    result = run_subprocess(["--run-dir", str(resumed), "--resume", "3"], ranks=2)
    assert "resumed from" in result.stderr
    assert_same_weights(final_weights(resumed), final_weights(one), 1e-5)
    # metrics.jsonl describes one run: the interrupted run's events after step 3 were replaced, not duplicated.
    steps = [e["step"] for e in read_metrics(resumed / "base") if e["event"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


# ---- kill -9 and SIGTERM ----------------------------------------------------------------------------------


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, tokenizer_dir, data_dir):
    args = [*wiki_args(data_dir), *TINY, "--num-iterations", "30", "--eval-every", "0"]
    uninterrupted = new_run(tmp_path / "uninterrupted", tokenizer_dir)
    assert main(["pretrain", "--run-dir", str(uninterrupted), *args, "--device", "cpu"]) == 0

    # The same run, saving after every step (saving does not change training), killed at a random step.
    killed = new_run(tmp_path / "killed", tokenizer_dir)
    kill_after = random.randint(2, 12)
    command = [sys.executable, "-m", "picochat", "pretrain", "--run-dir", str(killed), *args, "--save-every", "1",
               "--device", "cpu"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=subprocess_env())
    pointer = killed / "base" / "state" / "latest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads(pointer.read_text())["step"] >= kill_after:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    process.send_signal(signal.SIGSTOP)  # freeze it wherever it is (maybe mid-save), then kill it
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    stopped_at = json.loads(pointer.read_text())["step"]
    assert kill_after <= stopped_at < 30, "the run finished before it could be killed"

    assert main(["pretrain", "--run-dir", str(killed), "--resume", "--save-every", "0", "--device", "cpu"]) == 0
    expected, got = final_weights(uninterrupted), final_weights(killed)
    assert all(torch.equal(expected[name], got[name]) for name in expected), f"killed at step {stopped_at}"
    assert train_losses(killed) == train_losses(uninterrupted)


def test_sigterm_finishes_the_step_saves_and_exits_cleanly(tmp_path, tokenizer_dir, data_dir):
    run = new_run(tmp_path / "run", tokenizer_dir)
    command = [sys.executable, "-m", "picochat", "pretrain", "--run-dir", str(run), *wiki_args(data_dir), *TINY,
               "--num-iterations", "100000", "--eval-every", "0", "--device", "cpu"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=subprocess_env())  # fmt: skip
    metrics = run / "base" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"train"') >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr and f"picochat pretrain --resume --run-dir {run}" in stderr
    last_step = [e["step"] for e in read_metrics(run / "base") if e["event"] == "train"][-1]
    assert json.loads((run / "base" / "state" / "latest.json").read_text())["step"] == last_step
    assert last_step < 100000
    assert "Traceback" not in stderr


def test_sigterm_during_a_long_evaluation_stops_promptly(tmp_path, tokenizer_dir, data_dir):
    run = new_run(tmp_path / "run", tokenizer_dir)
    command = [sys.executable, "-m", "picochat", "pretrain", "--run-dir", str(run), *wiki_args(data_dir), *TINY,
               "--num-iterations", "10", "--eval-tokens", str(10**9), "--device", "cpu"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=subprocess_env())  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run / "base" / "config.json").is_file():
        time.sleep(0.01)
    time.sleep(1.0)  # well inside the first evaluation (10^9 tokens would take hours)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-2000:]
    assert "stopped by SIGTERM at step 0" in stderr and "nothing new to save" in stderr
    assert not any(event["event"] == "eval" for event in read_metrics(run / "base"))  # a cut-short eval is no result


# ---- files: metrics.jsonl and config.json --------------------------------------------------------------------


def test_metrics_and_config_files(tmp_path, tokenizer_dir, data_dir):
    from picochat.gpt import GPT, GPTConfig

    run = new_run(tmp_path / "run", tokenizer_dir)
    args = [*wiki_args(data_dir), *TINY, "--num-iterations", "4", "--eval-every", "2", "--sample-every", "2",
            "--save-every", "2", "--keep-checkpoints", "5"]  # fmt: skip
    assert main(["pretrain", "--run-dir", str(run), *args, "--device", "cpu"]) == 0
    events = read_metrics(run / "base")
    train = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3, 4]
    for event in train:
        for key in ("loss", "smooth_loss", "lr_multiplier", "muon_momentum", "tokens_per_second", "step_seconds",
                    "peak_memory_bytes", "elapsed_seconds", "training_seconds"):  # fmt: skip
            assert math.isfinite(event[key]) and event[key] >= 0, key
        assert 0 < event["mfu"] < 1 and event["peak_memory_bytes"] > 10 * 2**20
    assert train[0]["lr_multiplier"] == pytest.approx(0.5)  # warmup 2 steps: (0 + 1) / 2
    assert [e["step"] for e in events if e["event"] == "eval"] == [0, 2, 4]
    assert all(0 < e["val_bpb"] < 20 for e in events if e["event"] == "eval")
    samples = [e for e in events if e["event"] == "sample"]
    assert [e["step"] for e in samples] == [0, 2, 4] and len(samples[0]["samples"]) == 7
    assert samples[0]["samples"][0]["prompt"] == "The capital of France is"
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 4]

    config = json.loads((run / "base" / "config.json").read_text())
    derived, flags = config["derived"], config["flags"]
    scale = math.sqrt(256 / 2**19)
    assert derived["total_batch_size"] == 256 and derived["num_iterations"] == 4
    assert derived["gradient_accumulation"] == 2 and derived["world_size"] == 1
    assert derived["batch_lr_scale"] == pytest.approx(scale)
    assert derived["matrix_lr"] == pytest.approx(0.5 * scale) and derived["embedding_lr"] == pytest.approx(5 * scale)
    assert derived["target_tokens"] == int(12 * derived["scaling_params"])
    assert derived["weight_decay"] == pytest.approx(0.28 * scale * derived["reference_tokens"] /
                                                    derived["target_tokens"])  # fmt: skip
    assert derived["model_config"] == {"sequence_len": 32, "vocab_size": 512, "n_layer": 2, "n_head": 2,
                                       "n_kv_head": 2, "n_embd": 64, "window_pattern": "SSSL"}  # fmt: skip
    assert derived["training_tokens"] == 4 * 256 and derived["flops_per_token"] > 0
    assert flags["depth"] == 2 and flags["warmdown_ratio"] == DEFAULTS["warmdown_ratio"]
    # Saved resolved (a run must not depend on a symlink or the working folder staying as it was).
    val_file = data_dir / "pretrain" / "wikipedia_en" / "val_00000.parquet"
    assert config["data"]["val_files"] == [str(val_file.resolve())]
    tokenizer_hash = hashlib.sha256((run / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest()
    assert config["tokenizer"]["sha256"] == tokenizer_hash
    assert "git_commit" in config["provenance"] and config["provenance"]["world_size"] == 1

    # The weights load into the model the config describes, strictly.
    model = GPT.build(GPTConfig.from_dict(derived["model_config"]), "cpu")
    model.load_state_dict(final_weights(run), strict=True)


# ---- the depth dial -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "depth, batch, steps",
    [(8, 2**18, None), (12, 2**19, 2520), (20, 2**20, 4980), (24, 2**20, 8352), (26, 2**20, 10510), (32, 2**21, None)],
)
def test_depth_dial_matches_the_reference(depth, batch, steps):
    flags = {**DEFAULTS, "depth": depth}
    plan = derive_plan(flags, vocab_size=32768, world_size=1)
    assert plan["total_batch_size"] == batch
    if steps is not None:  # REFERENCE.md A.4's table (ratio 12)
        assert abs(plan["num_iterations"] - steps) <= 1
    assert plan["batch_lr_scale"] == pytest.approx(math.sqrt(batch / 2**19))
    if depth == 12:
        assert plan["weight_decay"] == pytest.approx(0.28) and plan["matrix_lr"] == pytest.approx(0.02)
    if depth == 24:
        assert plan["weight_decay"] == pytest.approx(0.060, abs=0.001)  # "d24 ~0.060" (derived in A.4)


def test_horizon_precedence():
    flags = {**DEFAULTS, "depth": 12}
    by_ratio = derive_plan(flags, 32768, 1)
    by_flops = derive_plan({**flags, "target_flops": 1e18}, 32768, 1)
    assert by_flops["horizon_source"] == "--target-flops"
    assert by_flops["num_iterations"] == round(1e18 / (by_ratio["flops_per_token"] * 2**19))
    both = derive_plan({**flags, "target_flops": 1e18, "num_iterations": 7}, 32768, 1)
    assert both["num_iterations"] == 7 and both["horizon_source"] == "--num-iterations"


def test_every_derived_value_can_be_overridden():
    flags = {**DEFAULTS, "depth": 12}
    plan = derive_plan({**flags, "total_batch_size": 2**18, "batch_lr_scale": 1.0, "muon_weight_decay": 0.1}, 32768, 1)
    assert plan["total_batch_size"] == 2**18 and plan["batch_source"] == "--total-batch-size"
    assert plan["batch_lr_scale"] == 1.0 and plan["matrix_lr"] == 0.02 and plan["embedding_lr"] == 0.3
    assert plan["weight_decay"] == 0.1
    assert derive_plan({**flags, "total_batch_size": 2**18}, 32768, 1)["batch_lr_scale"] == pytest.approx(0.5**0.5)


# ---- mistakes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value",
    [("--device-batch-size", "0"), ("--warmdown-ratio", "1.5"), ("--window-pattern", "SXL"), ("--depth", "two"),
     ("--matrix-lr", "-1"), ("--eval-every", "-5"), ("--resume", "soon"), ("--target-flops", "inf")],
)  # fmt: skip
def test_bad_flag_values_are_usage_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("picochat: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    return errors[0]


def test_user_mistakes_are_one_clear_line(tmp_path, tokenizer_dir, data_dir, capsys):
    bare = tmp_path / "bare"
    assert main(["pretrain", "--run-dir", str(bare), *wiki_args(data_dir), *TINY, "--device", "cpu"]) == 2
    assert "picochat tokenizer train --run-dir" in one_error_line(capsys)

    run = new_run(tmp_path / "run", tokenizer_dir)
    odd_batch = [*wiki_args(data_dir), *TINY, "--total-batch-size", "1000", "--device", "cpu"]
    assert main(["pretrain", "--run-dir", str(run), *odd_batch]) == 2
    line = one_error_line(capsys)
    assert "--total-batch-size 1,000" in line and "try --total-batch-size 896 or 1,024" in line

    assert main(["pretrain", "--run-dir", str(run), "--resume", "--device", "cpu"]) == 2
    assert "no checkpoint" in one_error_line(capsys)

    if importlib.util.find_spec("wandb") is None:  # never required: a clear error when asked for and missing
        assert main(["pretrain", "--run-dir", str(run), *wiki_args(data_dir), *TINY, "--wandb-run", "x"]) == 2
        assert "pip install wandb" in one_error_line(capsys)

    args = [*wiki_args(data_dir), *TINY, "--num-iterations", "1", "--eval-every", "0", "--device", "cpu"]
    assert main(["pretrain", "--run-dir", str(run), *args]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--run-dir", str(run), *args]) == 2  # would silently overwrite the run
    assert "continue it with --resume" in one_error_line(capsys)
    assert main(["pretrain", "--run-dir", str(run), "--resume", "--total-batch-size", "512", "--device", "cpu"]) == 2
    assert "--total-batch-size was 256" in one_error_line(capsys)


def test_a_pretrained_stage_loads_for_inference_and_chat(one_and_two_rank_runs, capsys):
    """The contract between training and inference: config.json's "model" + model.safetensors."""
    import picochat

    one, _ = one_and_two_rank_runs
    config = json.loads((one / "base" / "config.json").read_text())
    assert config["model"] == config["derived"]["model_config"]
    model, tokenizer = picochat.load(str(one))
    assert torch.equal(model.lm_head.weight.float(), final_weights(one)["lm_head.weight"].float())
    capsys.readouterr()
    assert main(["chat", "--run-dir", str(one), "-p", "Hello", "--max-tokens", "8", "--seed", "0",
                 "--device", "cpu"]) == 0  # fmt: skip
    assert "Traceback" not in capsys.readouterr().err
