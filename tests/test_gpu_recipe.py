"""The pretraining recipe a GPU runs, on the CPU: bf16 compute over fp32 master weights (the CUDA default) with
exact resume, and the speedrun preset's own pretrain command at tiny sizes on 2 gloo ranks with compile on.

Compilation uses the "aot_eager" backend here (see tests/test_compile.py for why and what it covers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import TINY, new_run, wiki_args
from safetensors.torch import load_file

from picochat.cli import main
from picochat.gpt import GPT, GPTConfig
from picochat.pipeline import command_line, plan_stages
from picochat.presets import SPEEDRUN
from picochat.stages.pretrain import resolve_embedding_dtype
from picochat.trainer import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def train_losses(run_dir: Path) -> list[float]:
    return [event["loss"] for event in read_metrics(run_dir / "base") if event["event"] == "train"]


def test_bf16_compute_with_fp32_masters_trains_and_resumes_exactly(tmp_path, tokenizer_dir, data_dir, monkeypatch):
    args = [*wiki_args(data_dir), *TINY, "--num-iterations", "4", "--eval-every", "0", "--save-every", "2",
            "--keep-checkpoints", "5", "--device", "cpu"]  # fmt: skip
    fp32 = new_run(tmp_path / "fp32", tokenizer_dir)
    assert main(["pretrain", "--run-dir", str(fp32), *args]) == 0
    # What CUDA does by default: bf16 compute, and (--embedding-dtype auto on CUDA) bf16 embedding storage.
    monkeypatch.setenv("PICOCHAT_DTYPE", "bfloat16")
    bf16 = new_run(tmp_path / "bf16", tokenizer_dir)
    assert main(["pretrain", "--run-dir", str(bf16), *args, "--embedding-dtype", "bfloat16"]) == 0
    assert json.loads((bf16 / "base" / "config.json").read_text())["provenance"]["compute_dtype"] == "bfloat16"
    weights = load_file(str(bf16 / "base" / "model.safetensors"))
    for name, tensor in weights.items():  # the matrices' masters stay fp32; the embeddings are stored in bf16
        embedding = name.startswith(("wte.", "value_embeds."))
        assert tensor.dtype == (torch.bfloat16 if embedding else torch.float32), name
    # bf16 really computed: the losses differ from fp32's, by bf16 rounding only.
    losses_fp32, losses_bf16 = train_losses(fp32), train_losses(bf16)
    assert losses_bf16 != losses_fp32
    assert losses_bf16 == pytest.approx(losses_fp32, rel=0.03)
    assert losses_bf16[-1] < losses_bf16[0]

    resumed = tmp_path / "resumed"
    shutil.copytree(bf16, resumed)
    assert main(["pretrain", "--run-dir", str(resumed), "--resume", "2", "--device", "cpu"]) == 0
    resumed_weights = load_file(str(resumed / "base" / "model.safetensors"))
    for name, tensor in weights.items():
        assert resumed_weights[name].equal(tensor), name  # bit for bit
    assert train_losses(resumed) == train_losses(bf16)
    # Those weights load into a model with fp32 embeddings (what CPU runs and inference build).
    model = GPT.build(GPTConfig.from_dict(json.loads((bf16 / "base" / "config.json").read_text())["model"]), "cpu")
    model.load_state_dict(weights)
    assert model.wte.weight.dtype == torch.float32 and model.wte.weight.equal(weights["wte.weight"].float())


def test_embedding_storage_follows_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_embedding_dtype("auto", cpu, torch.float32) == torch.float32
    assert resolve_embedding_dtype("auto", cpu, torch.bfloat16) == torch.float32
    assert resolve_embedding_dtype("auto", cuda, torch.bfloat16) == torch.bfloat16
    assert resolve_embedding_dtype("auto", cuda, torch.float32) == torch.float32
    assert resolve_embedding_dtype("float32", cuda, torch.bfloat16) == torch.float32


def test_speedrun_pretrain_command_on_two_ranks_with_compile(tmp_path, tokenizer_dir, data_dir):
    """The pretrain stage exactly as `picochat run --preset speedrun` plans it, sizes changed, plus the flags that are
    defaults on CUDA but not on a CPU (--compile). Two gloo ranks; nothing may compile after the first step."""
    data = tmp_path / "data"
    (data / "pretrain" / "wikipedia_en").mkdir(parents=True)
    for name in ("shard_00000.parquet", "val_00000.parquet"):
        (data / "pretrain" / "wikipedia_en" / name).symlink_to(data_dir / "pretrain" / "wikipedia_en" / name)
    tiny = dataclasses.replace(
        SPEEDRUN,
        depth=2,
        max_seq_len=256,
        device_batch_size=2,
        total_batch_size=1024,
        num_iterations=3,
        eval_every=3,
        eval_tokens=1024,
        save_every=0,
        nproc_per_node=2,
    )
    run_dir = new_run(tmp_path / "speedrun", tokenizer_dir)
    (stage,) = [stage for stage in plan_stages(tiny, run_dir, data) if stage.name == "pretrain"]
    assert stage.distributed
    argv = [*command_line(stage, tiny.nproc_per_node), "--device", "cpu", "--compile"]
    env = {**os.environ, "PICOCHAT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PICOCHAT_COMPILE_BACKEND": "aot_eager"}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # Step 1 compiles the model and the update functions (one per parameter shape); later steps compile nothing.
    graphs = [event["compiled_graphs"] for event in read_metrics(run_dir / "base") if event["event"] == "train"]
    assert graphs[0] > 1 and graphs == [graphs[0]] * 3
    config = json.loads((run_dir / "base" / "config.json").read_text())
    assert config["provenance"]["compile"] is True and config["derived"]["world_size"] == 2
    assert config["model"]["window_pattern"] == "SSSL" and config["derived"]["window_sizes"] == [128, 256]
    losses = train_losses(run_dir)
    assert len(losses) == 3 and losses[-1] < losses[0]
