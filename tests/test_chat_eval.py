"""Chat evaluation: the categorical answer is the most likely *allowed* letter, generative tasks count pass@k,
ChatCORE centers and averages the five tasks, and `picochat eval chat` runs every task on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model

from picochat.checkpoint import save_checkpoint
from picochat.cli import main
from picochat.common import PicochatError, atomic_write_json
from picochat.engine import Engine
from picochat.evaluation.chat import (
    ALL_TASKS,
    ChatTaskResult,
    chatcore,
    evaluate_categorical,
    evaluate_generative,
    parse_task_names,
)
from picochat.gpt import GPTConfig
from picochat.tasks import CATEGORICAL, Task

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoLetterTask(Task):
    """Questions whose allowed letters are A and B; the right answer is stored per conversation."""

    name = "two-letter"
    eval_type = CATEGORICAL
    baseline = 0.5

    def __init__(self, answers):
        self.answers = answers

    def __len__(self):
        return len(self.answers)

    def example(self, index):
        return {"messages": [{"role": "user", "content": f"question {index}"},
                             {"role": "assistant", "content": self.answers[index]}],
                "letters": ["A", "B"], "answer": self.answers[index]}  # fmt: skip

    def evaluate(self, conversation, response):
        return response == conversation["answer"]


class FavouriteTokenModel(torch.nn.Module):
    """Logits that rank token `best` first everywhere, then token `second`: a model with a fixed opinion."""

    def __init__(self, vocab_size: int, best: int, second: int):
        super().__init__()
        self.config = GPTConfig(sequence_len=256, vocab_size=vocab_size)
        self.weight = torch.nn.Parameter(torch.zeros(vocab_size))
        with torch.no_grad():
            self.weight[best], self.weight[second] = 10.0, 5.0

    def forward(self, ids):
        return self.weight.expand(*ids.shape, -1)


def test_categorical_answer_is_restricted_to_the_allowed_letters(tokenizer):
    letter_b = tokenizer.encode("B")[0]
    other = tokenizer.encode("Z")[0]  # the overall favourite, but not an allowed letter
    model = FavouriteTokenModel(tokenizer.vocab_size, best=other, second=letter_b)
    result = evaluate_categorical(model, tokenizer, TwoLetterTask(["B", "A", "B", "B", "A"]), batch_size=2)
    assert (result.correct, result.total) == (3, 5)  # always "B"
    assert result.accuracy == pytest.approx(0.6) and result.centered == pytest.approx(0.2)
    capped = evaluate_categorical(model, tokenizer, TwoLetterTask(["B", "A", "B"]), max_problems=2)
    assert capped.total == 2
    # ranks stride over problems: together they cover each problem once
    halves = [evaluate_categorical(model, tokenizer, TwoLetterTask(["B", "A", "B"]), rank=r, world_size=2)
              for r in range(2)]  # fmt: skip
    assert [h.total for h in halves] == [2, 1] and sum(h.correct for h in halves) == 2


def test_generative_is_pass_at_k(tokenizer, data_dir):
    class EchoTask(Task):
        name, baseline = "echo", 0.0

        def __len__(self):
            return 3

        def example(self, index):
            return {"messages": [{"role": "user", "content": "say something"}]}

        def evaluate(self, conversation, response):
            return len(response) > 0  # any reply passes

    engine = Engine(tiny_model(tokenizer.vocab_size), tokenizer)
    result = evaluate_generative(engine, EchoTask(), num_samples=2, max_new_tokens=4, temperature=1.0)
    assert result.total == 3 and result.details["num_samples"] == 2
    assert result.correct == sum(
        any(len(tokenizer.decode(c.tokens)) > 0 for c in engine.generate_batch(
            tokenizer.render_for_completion(EchoTask()[i]), num_samples=2, max_tokens=4, temperature=1.0, seed=i))
        for i in range(3)
    )  # fmt: skip


def test_chatcore_centers_and_averages_the_five_tasks():
    results = {
        "ARC-Easy": ChatTaskResult("ARC-Easy", "categorical", 50, 100, 0.25),
        "ARC-Challenge": ChatTaskResult("ARC-Challenge", "categorical", 25, 100, 0.25),
        "MMLU": ChatTaskResult("MMLU", "categorical", 100, 100, 0.25),
        "GSM8K": ChatTaskResult("GSM8K", "generative", 10, 100, 0.0),
        "HumanEval": ChatTaskResult("HumanEval", "generative", 0, 10, 0.0),
    }
    expected = ((0.5 - 0.25) / 0.75 + 0.0 + 1.0 + 0.1 + 0.0) / 5
    assert chatcore(results) == pytest.approx(expected)
    del results["HumanEval"]
    assert chatcore(results) is None


def test_task_names():
    assert parse_task_names(None) == list(ALL_TASKS)
    assert parse_task_names("gsm8k, arc_easy") == ["ARC-Easy", "GSM8K"]
    with pytest.raises(PicochatError, match="unknown task 'piqa'"):
        parse_task_names("GSM8K,piqa")


def test_eval_chat_command_runs_every_task_and_writes_chatcore(tmp_path, tokenizer, data_dir, capsys):
    run = tmp_path / "run"
    tokenizer.save(run / "tokenizer")
    model = tiny_model(tokenizer.vocab_size)
    save_checkpoint(run / "sft", 2, model.state_dict(), {})
    atomic_write_json(run / "sft" / "config.json", {"model": model.config.to_dict()})
    arguments = ["eval", "chat", "--run-dir", str(run), "--data-dir", str(data_dir), "--max-problems", "2",
                 "--max-new-tokens", "8", "--device", "cpu"]  # fmt: skip
    assert main(arguments) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    document = json.loads((run / "eval" / "chat_sft_step000002.json").read_text())
    assert document["kind"] == "chat" and set(document["tasks"]) == set(ALL_TASKS)
    assert all(task["total"] == 2 for task in document["tasks"].values())
    assert document["ChatCORE"] is not None and summary["chatcore"] == document["ChatCORE"]
    assert -1.0 / 3 <= document["ChatCORE"] <= 1.0
    assert main([*arguments, "--tasks", "GSM8K,nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
