"""`picochat sft`: packing never yields NaN and accounts for every conversation; the stage inherits settings, trains
on a mixture, validates, writes a loadable stage folder and resumes exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import tiny_model
from safetensors.torch import load_file

from picochat.checkpoint import load_model, save_checkpoint
from picochat.cli import main
from picochat.common import PicochatError, atomic_write_json
from picochat.packing import sft_batches
from picochat.stages.sft import count_epoch_steps, inherited_settings, source_stage_dir, split_mixture
from picochat.tasks import Identity, build_mixture
from picochat.tokenizer import Tokenizer
from picochat.trainer import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def make_run(folder, tokenizer) -> None:
    """A run folder as pretraining leaves it: tokenizer/ and base/ with weights and a config.json that records the
    flags and the derived (batch-scaled) learning rates."""
    tokenizer.save(folder / "tokenizer")
    model = tiny_model(tokenizer.vocab_size, sequence_len=512)
    save_checkpoint(folder / "base", 1, model.state_dict(), {})
    atomic_write_json(folder / "base" / "config.json", {
        "model": model.config.to_dict(),
        "flags": {"max_seq_len": 128, "device_batch_size": 2, "total_batch_size": 512, "embedding_lr": 0.3},
        "derived": {"total_batch_size": 512, "embedding_lr": 0.3, "unembedding_lr": 0.02, "matrix_lr": 0.05,
                    "scalar_lr": 0.3},
    })  # fmt: skip


# ---- packing: the NaN fuzz -----------------------------------------------------------------------------------


class SyntheticRenderer:
    """A tokenizer stand-in whose render_conversation returns a conversation of a given length and mask shape, so
    the fuzz reaches lengths (1 token, 5 rows) and masks (none supervised, only the first) real text rarely gives."""

    def __init__(self, tokenizer: Tokenizer):
        self.bos_token_id = tokenizer.bos_token_id
        self.vocab_size = tokenizer.vocab_size

    def render_conversation(self, conversation, max_tokens):
        length, kind, seed = conversation["length"], conversation["mask"], conversation["seed"]
        rng = np.random.default_rng(seed)
        ids = [self.bos_token_id, *rng.integers(0, self.bos_token_id, length - 1).tolist()]
        if kind == "none":
            mask = [0] * length
        elif kind == "first":
            mask = [1] + [0] * (length - 1)
        elif kind == "last":
            mask = [0] * (length - 1) + [1]
        else:
            mask = [0] + rng.integers(0, 2, length - 1).tolist()
        return ids[:max_tokens], mask[:max_tokens]


@pytest.mark.parametrize("seq_len", [128, 256, 512])
def test_packing_fuzz_never_nan_and_accounts_for_every_conversation(tokenizer, seq_len):
    rng = np.random.default_rng(seq_len)
    row = seq_len + 1
    lengths = [1, 2, row - 1, row, row + 1, 5 * row, *rng.integers(1, 5 * row + 1, 60).tolist()]
    kinds = ["none", "first", "last", "random"]
    conversations = [{"length": int(n), "mask": kinds[rng.integers(0, 4)] if i >= 6 else "random", "seed": i}
                     for i, n in enumerate(lengths)]  # fmt: skip
    renderer = SyntheticRenderer(tokenizer)
    model = tiny_model(tokenizer.vocab_size, sequence_len=seq_len)
    batches, state = 0, None
    for inputs, targets, batch_state in sft_batches(conversations, renderer, 4, seq_len, loop=False):
        state = batch_state
        assert (targets != -1).any(dim=1).all()  # never an all-masked row
        loss = model(inputs, targets)
        assert torch.isfinite(loss)
        batches += 1
    assert batches > 0
    stats = state["stats"]
    # Every conversation was read, and each was dropped (no supervised token after its first), packed whole (cut to
    # one row when longer), or is still buffered when the first stream ran out (loop=False ends the epoch there):
    # the tokens in the rows plus those buffered are exactly those of the conversations not dropped.
    assert stats["documents_read"] == len(conversations)
    droppable = [c for c in conversations if not any(renderer.render_conversation(c, row)[1][1:])]
    kept = [c for c in conversations if c not in droppable]
    assert stats["documents_dropped"] == len(droppable)
    assert stats["documents_truncated"] == sum(c["length"] > row for c in conversations)
    buffered = [int(length) for stream in state["streams"] for length in stream["lengths"]]
    packed_tokens = stats["row_tokens"] - stats["padding_tokens"]
    assert packed_tokens + sum(buffered) == sum(min(c["length"], row) for c in kept)
    assert len(buffered) < len(kept) / 2  # most of the epoch was trained on


def test_packing_of_real_conversations_at_short_rows(tokenizer, data_dir):
    """Real rendered conversations (identity, gsm8k) at a row length far below their lengths: finite, complete."""
    mixture = build_mixture("identity:0.05,gsm8k:0.01", data_dir=data_dir, identity_name="Pico")
    model = tiny_model(tokenizer.vocab_size, sequence_len=128)
    state = None
    for inputs, targets, batch_state in sft_batches(mixture, tokenizer, 8, 128, loop=False):
        assert torch.isfinite(model(inputs, targets))
        state = batch_state
    assert state["stats"]["documents_read"] == len(mixture)


# ---- pieces of the stage -------------------------------------------------------------------------------------


def test_inherited_settings_prefer_flags_then_the_source_run():
    from argparse import Namespace

    source = {"flags": {"max_seq_len": 256, "device_batch_size": 8, "matrix_lr": 0.02},
              "derived": {"total_batch_size": 4096, "embedding_lr": 0.1, "unembedding_lr": 0.002, "matrix_lr": 0.004,
                          "scalar_lr": 0.2}}  # fmt: skip
    args = Namespace(max_seq_len=None, device_batch_size=4, total_batch_size=None, embedding_lr=None,
                     unembedding_lr=None, matrix_lr=None, scalar_lr=None)  # fmt: skip
    values, rows = inherited_settings(args, source)
    assert values == {
        "max_seq_len": 256,
        "device_batch_size": 4,
        "total_batch_size": 4096,
        "embedding_lr": 0.1,
        "unembedding_lr": 0.002,
        "matrix_lr": 0.004,
        "scalar_lr": 0.2,
    }  # the LRs actually used
    assert {row["setting"]: row["from"] for row in rows}["device_batch_size"] == "flag"
    with pytest.raises(PicochatError, match="no embedding_lr; give --embedding-lr"):
        inherited_settings(args, {"flags": {"max_seq_len": 1, "total_batch_size": 1}})


def test_source_stage_prefers_mid(tmp_path, tokenizer):
    make_run(tmp_path, tokenizer)
    assert source_stage_dir(tmp_path, "sft", None) == tmp_path / "base"
    (tmp_path / "mid").mkdir()
    shutil.copy(tmp_path / "base" / "model.safetensors", tmp_path / "mid" / "model.safetensors")
    assert source_stage_dir(tmp_path, "sft", None) == tmp_path / "mid"
    assert source_stage_dir(tmp_path, "mid", None) == tmp_path / "base"
    with pytest.raises(PicochatError, match="itself"):
        source_stage_dir(tmp_path, "mid", "mid")
    with pytest.raises(PicochatError, match="no trained model"):
        source_stage_dir(tmp_path / "nothing", "sft", None)


def test_split_and_epoch_count(tokenizer):
    identity = Identity("Pico", seed=0)
    train, val = split_mixture(build_mixture("identity:0.1", identity_name="Pico"), 10)
    assert len(val) == 10 and len(train) == round(0.1 * len(identity)) - 10
    steps, packing = count_epoch_steps(train, tokenizer, rows_per_step=4, seq_len=128)
    batches = sum(1 for _ in sft_batches(train, tokenizer, 4, 128, loop=False))
    assert steps == batches and packing["documents_read"] == len(train)
    with pytest.raises(PicochatError, match="only"):
        split_mixture(build_mixture("identity:0.01"), 1000)


# ---- the stage -----------------------------------------------------------------------------------------------


SFT_ARGS = ["--mix", "identity:0.1,gsm8k:0.005", "--identity-name", "Pico", "--val-conversations", "16",
            "--num-iterations", "4", "--eval-every", "2", "--eval-tokens", "512", "--save-every", "2",
            "--keep-checkpoints", "5", "--device", "cpu", "--embedding-lr", "1.0"]  # fmt: skip


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tokenizer, data_dir):
    run = tmp_path_factory.mktemp("sft_run")
    make_run(run, tokenizer)
    assert main(["sft", "--run-dir", str(run), "--data-dir", str(data_dir), *SFT_ARGS]) == 0
    return run


def test_sft_stage_trains_validates_and_writes_a_loadable_stage(sft_run, capfd):
    events = read_metrics(sft_run / "sft")
    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in train] == [1, 2, 3, 4]
    assert all(np.isfinite(e["loss"]) for e in train)
    assert [e["step"] for e in evals] == [0, 2, 4] and all(np.isfinite(e["val_bpb"]) for e in evals)
    assert any(e["event"] == "sample" and e["samples"][0]["prompt"] == "What is your name?" for e in events)
    config = json.loads((sft_run / "sft" / "config.json").read_text())
    assert config["model"]["n_layer"] == 2 and config["source"]["stage"] == "base"
    assert config["settings"]["max_seq_len"] == 128 and config["inherited"]["max_seq_len"] == "inherited"
    assert config["settings"]["embedding_lr"] == 1.0 and config["inherited"]["embedding_lr"] == "flag"
    assert config["data"]["val_conversations"] == 16
    model = load_model(sft_run / "sft", device="cpu")  # the stage folder loads like any other
    base = load_file(str(sft_run / "base" / "model.safetensors"))
    assert not torch.equal(model.state_dict()["lm_head.weight"], base["lm_head.weight"])  # it trained


def test_sft_resumes_exactly(sft_run, tmp_path, data_dir):
    copy = tmp_path / "copy"
    shutil.copytree(sft_run, copy)
    assert main(["sft", "--run-dir", str(copy), "--data-dir", str(data_dir), "--resume", "2", *SFT_ARGS]) == 0
    straight = load_file(str(sft_run / "sft" / "model.safetensors"))
    resumed = load_file(str(copy / "sft" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    losses = lambda run: [e["loss"] for e in read_metrics(run / "sft") if e["event"] == "train"]  # noqa: E731
    assert losses(copy) == losses(sft_run)


def test_sft_resume_refuses_another_seed_and_keeps_the_run_s(sft_run, data_dir, capsys):
    # The saved loader state points into the mixture this seed shuffled: an explicit --seed 0 is the run's own
    # value (allowed), --seed 1 would reshuffle it (refused, before any work).
    resume = ["sft", "--run-dir", str(sft_run), "--data-dir", str(data_dir), "--resume", "2", *SFT_ARGS]
    assert main([*resume, "--seed", "1"]) == 2
    assert "--seed was 0 for this run, not 1" in capsys.readouterr().err


def test_sft_refuses_to_overwrite_and_reports_bad_mix(sft_run, tmp_path, tokenizer, data_dir, capsys):
    assert main(["sft", "--run-dir", str(sft_run), "--data-dir", str(data_dir), *SFT_ARGS]) == 2
    assert "already holds a run" in capsys.readouterr().err
    make_run(tmp_path, tokenizer)
    assert main(["sft", "--run-dir", str(tmp_path), "--mix", "nonsense:1", "--device", "cpu"]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert main(["sft", "--run-dir", str(tmp_path), "--max-seq-len", "4096", "--mix", "identity:0.01"]) == 2
    assert "longer than the model's context" in capsys.readouterr().err


def test_midtraining_then_sft_starts_from_mid_with_chat_evaluation(tmp_path, tokenizer, data_dir):
    make_run(tmp_path, tokenizer)
    common = ["--run-dir", str(tmp_path), "--data-dir", str(data_dir), "--num-iterations", "2", "--eval-every", "0",
              "--eval-tokens", "256", "--val-conversations", "24", "--device", "cpu"]  # fmt: skip
    assert main(["sft", "--stage", "mid", "--mix", "identity:0.05,arc_easy:0.01", *common]) == 0
    mid = json.loads((tmp_path / "mid" / "config.json").read_text())
    assert mid["stage"] == "mid" and mid["source"]["stage"] == "base"
    assert main(["sft", "--mix", "identity:0.05", "--chat-eval-tasks", "ARC-Easy,GSM8K", "--chat-eval-max-problems",
                 "2", *common]) == 0  # fmt: skip
    sft = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert sft["source"]["stage"] == "mid"
    evaluation = json.loads((tmp_path / "sft" / "chat_eval" / "step_000002.json").read_text())
    assert {name: task["total"] for name, task in evaluation["tasks"].items()} == {"ARC-Easy": 2, "GSM8K": 2}
