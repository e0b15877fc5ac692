"""RL on GSM8K: rewards on known right and wrong answers, group-mean advantages, loss masks for forced tool
output, the policy-gradient loss, and `picochat rl`: runs, logs rewards and pass@k, checkpoints and resumes exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import tiny_model
from safetensors.torch import load_file

from picochat.checkpoint import load_checkpoint, save_checkpoint
from picochat.cli import main
from picochat.common import atomic_write_json
from picochat.engine import Completion
from picochat.gpt import GPT, GPTConfig
from picochat.rl import (
    Rollout,
    group_advantages,
    pass_at_k,
    policy_gradient_loss,
    rollout_seed,
    rollout_tensors,
    sample_rollout,
)
from picochat.tasks import GSM8K
from picochat.trainer import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- rewards ---------------------------------------------------------------------------------------------------


def test_gsm8k_reward_on_known_right_and_wrong_completions(data_dir, monkeypatch):
    monkeypatch.undo()  # the real reward, not the stand-in of the stage tests
    task = GSM8K("test", data_dir=data_dir)
    conversation = task[0]
    answer = conversation["answer"]
    assert task.reward(conversation, f"She sells the rest.\n#### {answer}") == 1.0
    assert task.reward(conversation, f"<|python_start|>3*2<|python_end|><|output_start|>6<|output_end|> #### {answer}"
                       ) == 1.0  # fmt: skip
    assert task.reward(conversation, f"#### {int(answer) + 1}") == 0.0
    assert task.reward(conversation, f"The answer is {answer}") == 0.0  # no "#### " marker
    assert task.reward(conversation, "") == 0.0


def test_group_advantages_and_pass_at_k():
    assert group_advantages([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages([1.0, 1.0]) == [0.0, 0.0]  # all equal: nothing to learn
    assert group_advantages([0.0, 0.0, 0.0, 1.0]) == [-0.25, -0.25, -0.25, 0.75]
    correct = [[False, True], [False, False], [True, False]]
    assert pass_at_k(correct, 1) == pytest.approx(1 / 3)
    assert pass_at_k(correct, 2) == pytest.approx(2 / 3)
    assert rollout_seed(1, 2, 3) == rollout_seed(1, 2, 3) != rollout_seed(1, 2, 4)


def test_rollout_tensors_mask_prompt_forced_tokens_and_padding():
    prompt = [9, 8, 7]
    stopped = Completion(tokens=[1, 2, 3, 4], masks=[1, 0, 0, 1], finish_reason="stop")  # 2, 3 forced (tool output)
    cut = Completion(tokens=[5], masks=[1], finish_reason="length")
    rollout = Rollout(prompt, [stopped, cut], [1.0, 0.0])
    inputs, targets, advantages = rollout_tensors(rollout, stop_token=99, pad_token=99)
    assert inputs.tolist() == [[9, 8, 7, 1, 2, 3, 4], [9, 8, 7, 5, 99, 99, 99]]
    # targets: the next token where it was sampled: the prompt's and the forced ones are -1; the stop token counts.
    assert targets.tolist() == [[-1, -1, 1, -1, -1, 4, 99], [-1, -1, 5, -1, -1, -1, -1]]
    assert advantages.tolist() == [0.5, -0.5]


def test_policy_gradient_loss_matches_its_formula(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    inputs = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    targets = torch.tensor([[-1, 3, 4, 9], [-1, -1, 8, -1]])
    advantages = torch.tensor([0.5, -1.0])
    loss, count = policy_gradient_loss(model, inputs, targets, advantages, normaliser=4.0)
    log_probs = torch.log_softmax(model(inputs), dim=-1)
    expected = 0.0
    for row in range(2):
        for t in range(4):
            if targets[row, t] != -1:
                expected -= advantages[row] * log_probs[row, t, targets[row, t]]
    assert count == 4
    assert loss.item() == pytest.approx(expected.item() / 4.0, rel=1e-4)
    loss.backward()  # differentiable
    assert model.lm_head.weight.grad is not None


def test_sample_rollout_scores_with_the_task(tokenizer, data_dir):
    from picochat.engine import Engine

    engine = Engine(tiny_model(tokenizer.vocab_size), tokenizer)
    task = GSM8K("train", data_dir=data_dir)
    first = sample_rollout(engine, task, 0, num_samples=3, max_new_tokens=6, temperature=1.0, top_k=None,
                           device_batch_size=2, seed_parts=(0, 0))  # fmt: skip
    again = sample_rollout(engine, task, 0, num_samples=3, max_new_tokens=6, temperature=1.0, top_k=None,
                           device_batch_size=2, seed_parts=(0, 0))  # fmt: skip
    assert len(first.completions) == 3
    expected = [parity_reward(None, None, tokenizer.decode(c.tokens)) for c in first.completions]
    assert first.rewards == expected  # scored by the task's reward, on the decoded completion
    assert [c.tokens for c in first.completions] == [c.tokens for c in again.completions]  # seeded


# ---- the stage ---------------------------------------------------------------------------------------------


RL_ARGS = ["--source", "base", "--examples-per-step", "2", "--num-samples", "3", "--device-batch-size", "2",
           "--max-new-tokens", "6", "--num-steps", "3", "--eval-every", "2", "--eval-examples", "2",
           "--eval-samples", "2", "--save-every", "1", "--keep-checkpoints", "5", "--init-lr-frac", "1.0",
           "--device", "cpu"]  # fmt: skip


def parity_reward(self, conversation, response):
    """A stand-in reward a random tiny model earns half the time (GSM8K's it never earns): the advantages are
    not all zero, so the steps really change the weights and the resume test compares something."""
    return float(len(response) % 2)


@pytest.fixture(autouse=True)
def varied_rewards(monkeypatch):
    monkeypatch.setattr(GSM8K, "reward", parity_reward)


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory, tokenizer, data_dir):
    run = tmp_path_factory.mktemp("rl_run")
    tokenizer.save(run / "tokenizer")
    model = tiny_model(tokenizer.vocab_size)
    save_checkpoint(run / "base", 1, model.state_dict(), {})
    atomic_write_json(run / "base" / "config.json", {"model": model.config.to_dict()})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GSM8K, "reward", parity_reward)
        assert main(["rl", "--run-dir", str(run), "--data-dir", str(data_dir), *RL_ARGS]) == 0
    return run


def test_rl_runs_logs_rewards_and_checkpoints(rl_run):
    events = read_metrics(rl_run / "rl")
    train = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3]
    assert all(0.0 <= e["mean_reward"] <= 1.0 and e["sampled_tokens"] > 0 for e in train)
    assert any(0.0 < e["mean_reward"] < 1.0 for e in train)  # mixed rewards: the loss has a gradient
    base = load_file(str(rl_run / "base" / "model.safetensors"))
    trained = load_file(str(rl_run / "rl" / "model.safetensors"))
    assert any(not torch.equal(base[name], trained[name]) for name in base)
    assert [e["lr_multiplier"] for e in train] == pytest.approx([1.0, 2 / 3, 1 / 3])
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 3] and all("pass@2" in e for e in evals)
    checkpoint = load_checkpoint(rl_run / "rl")
    assert checkpoint.step == 3 and "optimizer" in checkpoint.training_state
    config = json.loads((rl_run / "rl" / "config.json").read_text())
    assert config["model"]["n_layer"] == 2 and config["settings"]["num_steps"] == 3


def test_rl_resumes_exactly(rl_run, tmp_path, data_dir):
    copy = tmp_path / "copy"
    shutil.copytree(rl_run, copy)
    assert main(["rl", "--run-dir", str(copy), "--data-dir", str(data_dir), "--resume", "1", *RL_ARGS]) == 0
    straight = load_file(str(rl_run / "rl" / "model.safetensors"))
    resumed = load_file(str(copy / "rl" / "model.safetensors"))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    strip = lambda run: [{k: v for k, v in e.items() if k not in ("step_seconds", "path")}  # noqa: E731
                         for e in read_metrics(run / "rl")]  # fmt: skip
    assert strip(copy) == strip(rl_run)


def test_rl_refuses_a_changed_setting_on_resume(rl_run, tmp_path, data_dir, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(rl_run, copy)
    changed = [a if a != "3" else "4" for a in RL_ARGS]  # --num-samples 4
    assert main(["rl", "--run-dir", str(copy), "--data-dir", str(data_dir), "--resume", *changed]) == 2
    assert "num_samples" in capsys.readouterr().err
    assert main(["rl", "--run-dir", str(rl_run), "--data-dir", str(data_dir), *RL_ARGS]) == 2
    assert "already holds an RL run" in capsys.readouterr().err


def test_a_prompt_longer_than_the_context_is_a_clear_error(tokenizer, data_dir):
    from picochat.common import PicochatError
    from picochat.engine import Engine

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=16, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)
    engine = Engine(GPT.build(config, "cpu"), tokenizer)
    with pytest.raises(PicochatError, match="GSM8K question 0: its prompt of .* fills the model's context of 16"):
        sample_rollout(engine, GSM8K("train", data_dir=data_dir), 0, num_samples=1, max_new_tokens=4,
                       temperature=1.0, top_k=None, device_batch_size=1, seed_parts=(0,))  # fmt: skip


def test_rl_stopped_by_sigint_saves_and_resumes_exactly(rl_run, tmp_path, data_dir, monkeypatch, capsys):
    import os
    import signal

    run = tmp_path / "run"
    shutil.copytree(rl_run, run, ignore=shutil.ignore_patterns("rl"))
    calls = []

    def reward_then_ctrl_c(self, conversation, response):
        calls.append(1)
        if len(calls) == 12:  # the eval at step 0 takes 4 rewards, each step 6: this is inside step 2
            os.kill(os.getpid(), signal.SIGINT)
        return parity_reward(self, conversation, response)

    monkeypatch.setattr(GSM8K, "reward", reward_then_ctrl_c)
    args = ["rl", "--run-dir", str(run), "--data-dir", str(data_dir), *RL_ARGS, "--save-every", "0"]
    assert main(args) == 0  # the step in flight finishes, a checkpoint is saved, the stage exits cleanly
    assert "stopped by SIGINT at step 2 of 3; a checkpoint is saved" in capsys.readouterr().err
    assert load_checkpoint(run / "rl").step == 2

    monkeypatch.setattr(GSM8K, "reward", parity_reward)
    assert main(["rl", "--run-dir", str(run), "--data-dir", str(data_dir), "--resume"]) == 0  # flags from config
    straight = load_file(str(rl_run / "rl" / "model.safetensors"))
    resumed = load_file(str(run / "rl" / "model.safetensors"))
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)

    def events(path):
        return [
            {k: v for k, v in e.items() if k != "step_seconds"}
            for e in read_metrics(path / "rl")
            if e["event"] != "checkpoint"
        ]

    assert events(run) == events(rl_run)
