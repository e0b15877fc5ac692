"""Chat evaluations and ChatCORE (REFERENCE A.18).

Two kinds of task:

  categorical (ARC-Easy, ARC-Challenge, MMLU): the question is rendered as a prompt for the assistant's reply;
      one forward pass over a batch of prompts (right-padded with BOS), and at each prompt's last position the
      logits of the allowed answer letters only are compared: the most likely letter is the answer. No sampling,
      so a model that cannot yet follow the format is still measured on what it knows.
  generative (GSM8K, HumanEval, spelling): num_samples replies sampled with the Engine (tool use on); a problem
      counts as solved if any sample passes the task's check (pass@num_samples).

Ranks stride over problems (rank r takes problems r, r + world, ...) and the counts are summed over ranks.

ChatCORE = mean over ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval of the centered accuracy
(accuracy - baseline) / (1 - baseline), baselines 0.25 for the 4-way multiple choice and 0 for the generative
tasks: 0 means "no better than guessing", 1 is perfect. It is reported only when all five ran. Spelling is
reported beside it (it was part of the reference's ChatCORE until Jul 2026).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from picochat.common import PicochatError, progress
from picochat.hardware import is_distributed

CHATCORE_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
ALL_TASKS = (*CHATCORE_TASKS, "spelling")


@dataclass
class ChatTaskResult:
    task: str
    kind: str  # "categorical" or "generative"
    correct: int
    total: int
    baseline: float
    details: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def centered(self) -> float:
        return (self.accuracy - self.baseline) / (1.0 - self.baseline)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "kind": self.kind,
            "correct": self.correct,
            "total": self.total,
            "accuracy": self.accuracy,
            "baseline": self.baseline,
            "centered": self.centered,
            **self.details,
        }


def load_task(name: str, data_dir: str | os.PathLike | None = None):
    """The evaluation split of a task by its name (case-insensitive)."""
    from picochat.tasks import ARC, GSM8K, MMLU, HumanEval, Spelling

    key = name.strip().lower()
    if key in ("arc-easy", "arc_easy"):
        return ARC("easy", "test", data_dir=data_dir)
    if key in ("arc-challenge", "arc_challenge"):
        return ARC("challenge", "test", data_dir=data_dir)
    if key == "mmlu":
        return MMLU("test", data_dir=data_dir)
    if key == "gsm8k":
        return GSM8K("test", data_dir=data_dir)
    if key == "humaneval":
        return HumanEval(data_dir=data_dir)
    if key == "spelling":
        return Spelling("mixed", "test", data_dir=data_dir)
    raise PicochatError(f"unknown chat task {name!r}; expected one of {', '.join(ALL_TASKS)}")


def parse_task_names(text: str | None) -> list[str]:
    """ "ARC-Easy,GSM8K" -> canonical names in ALL_TASKS order; None -> all of them."""
    if text is None:
        return list(ALL_TASKS)
    canonical = {name.lower().replace("_", "-"): name for name in ALL_TASKS}
    names = []
    for part in text.split(","):
        key = part.strip().lower().replace("_", "-")
        if key not in canonical:
            raise PicochatError(f"--tasks: unknown task {part.strip()!r}; expected some of {', '.join(ALL_TASKS)}")
        names.append(canonical[key])
    return [name for name in ALL_TASKS if name in names]


def _sum_over_ranks(values: list[int], device: torch.device, world_size: int) -> list[int]:
    """Counts summed over the ranks that split the work (none when world_size is 1: e.g. rank 0 alone evaluating
    during training, while the other ranks wait)."""
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    if world_size > 1 and is_distributed():
        dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]


def letter_token_ids(tokenizer, letters: list[str]) -> list[int]:
    """The token of each answer letter; every letter must be a single token (it is, for A-J, in any BPE)."""
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise PicochatError(f"answer letter {letter!r} is {len(encoded)} tokens in this tokenizer, expected 1")
        ids.append(encoded[0])
    return ids


@torch.no_grad()
def evaluate_categorical(
    model, tokenizer, task, *, max_problems: int | None = None, batch_size: int = 8, rank: int = 0, world_size: int = 1
) -> ChatTaskResult:
    """Accuracy of the most likely allowed letter at the answer position."""
    count = len(task) if max_problems is None else min(max_problems, len(task))
    indices = list(range(rank, count, world_size))
    device = next(model.parameters()).device
    context = model.config.sequence_len
    correct = 0
    for start in progress(range(0, len(indices), batch_size), desc=task.name, unit="batch"):
        conversations = [task[i] for i in indices[start : start + batch_size]]
        prompts = [tokenizer.render_for_completion(c)[-context:] for c in conversations]  # keep the answer end
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), tokenizer.bos_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt)
        logits = model(ids.to(device))  # (B, T, V)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = task.allowed_letters(conversation)
            letter_logits = logits[row, len(prompt) - 1, letter_token_ids(tokenizer, letters)]
            answer = letters[int(letter_logits.argmax())]
            correct += int(task.evaluate(conversation, answer))
    correct, total = _sum_over_ranks([correct, len(indices)], device, world_size)
    return ChatTaskResult(task.name, "categorical", correct, total, task.baseline)


def evaluate_generative(
    engine,
    task,
    *,
    max_problems: int | None = None,
    num_samples: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_k: int | None = 50,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> ChatTaskResult:
    """pass@num_samples: a problem is solved if any of its samples passes task.evaluate."""
    count = len(task) if max_problems is None else min(max_problems, len(task))
    indices = list(range(rank, count, world_size))
    tokenizer, correct, skipped = engine.tokenizer, 0, 0
    for index in progress(indices, desc=task.name, unit="problem"):
        conversation = task[index]
        prompt = tokenizer.render_for_completion(conversation)
        room = engine.context_len - len(prompt)
        if room < 1:
            skipped += 1  # counted as wrong (the prompt alone fills the context), and reported
            continue
        completions = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=min(max_new_tokens, room),
                                            temperature=temperature, top_k=top_k, seed=seed + index)  # fmt: skip
        correct += int(any(task.evaluate(conversation, tokenizer.decode(c.tokens)) for c in completions))
    correct, total, skipped = _sum_over_ranks([correct, len(indices), skipped], engine.device, world_size)
    return ChatTaskResult(
        task.name,
        "generative",
        correct,
        total,
        task.baseline,
        {"num_samples": num_samples, "prompts_too_long": skipped},
    )


def chatcore(results: dict[str, ChatTaskResult]) -> float | None:
    """Mean centered accuracy over the five ChatCORE tasks; None unless all five were evaluated."""
    if not all(name in results and results[name].total > 0 for name in CHATCORE_TASKS):
        return None
    return sum(results[name].centered for name in CHATCORE_TASKS) / len(CHATCORE_TASKS)


def run_chat_eval(
    model,
    tokenizer,
    task_names: list[str],
    *,
    data_dir=None,
    max_problems: int | None = None,
    num_samples: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_k: int | None = 50,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Evaluate each named task; returns {"tasks": {name: result dict}, "ChatCORE": float | None, ...}."""
    from picochat.engine import Engine

    engine = Engine(model, tokenizer)
    results: dict[str, ChatTaskResult] = {}
    for name in task_names:
        task = load_task(name, data_dir)
        if task.eval_type == "categorical":
            result = evaluate_categorical(model, tokenizer, task, max_problems=max_problems, batch_size=batch_size,
                                          rank=rank, world_size=world_size)  # fmt: skip
        else:
            result = evaluate_generative(engine, task, max_problems=max_problems, num_samples=num_samples,
                                         max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                         rank=rank, world_size=world_size)  # fmt: skip
        results[name] = result
    core = chatcore(results)
    categorical = [results[n].centered for n in CHATCORE_TASKS[:3] if n in results and results[n].total]
    return {
        "tasks": {name: result.to_dict() for name, result in results.items()},
        "ChatCORE": core,
        "ChatCORE_cat": sum(categorical) / 3 if len(categorical) == 3 else None,
        "settings": {
            "max_problems": max_problems,
            "num_samples": num_samples,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_k": top_k,
        },
    }
