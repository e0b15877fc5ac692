"""Reinforcement learning on verifiable answers (GSM8K): rollouts, rewards, advantages and the policy-gradient loss.

The algorithm is the reference's (REFERENCE A.17): on-policy REINFORCE with a group-mean baseline.

  for each question q:      sample G completions y_1..y_G from the current model (the Engine, with tool use)
                            reward r_i = 1 if y_i's final answer ("#### n") is right, else 0
                            advantage A_i = r_i - mean(r_1..r_G)          (no division by the std)
  loss = - sum_i sum_t A_i log p(y_i,t | q, y_i,<t)  /  (number of sampled tokens)

  - fully on-policy: the samples come from the weights being updated, so there is no importance ratio, no
    clipping and no KL penalty to a reference model;
  - token-level normalisation (as in DAPO): every sampled token weighs the same, so long answers are not
    down-weighted the way a per-sequence mean would;
  - only tokens the model sampled carry a loss: the prompt and the tool outputs the Engine forced into the
    sequence (Engine mask 0) have target -1. A question whose G rewards are all equal has zero advantages and
    teaches nothing (correct: nothing to compare against).

Everything here is deterministic given (step, question, pass): the sampling seed is derived from them, so a resumed
run draws the same samples as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from picochat.common import PicochatError
from picochat.engine import Completion


@dataclass
class Rollout:
    """G sampled completions of one question, and their rewards."""

    prompt: list[int]
    completions: list[Completion]
    rewards: list[float]

    @property
    def advantages(self) -> list[float]:
        return group_advantages(self.rewards)


def rollout_seed(*parts: int) -> int:
    """A 63-bit seed from integers (step, question, pass): stable across processes (unlike hash())."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def group_advantages(rewards: list[float]) -> list[float]:
    """reward - mean reward of the group: the group-mean baseline."""
    mean = sum(rewards) / len(rewards) if rewards else 0.0
    return [reward - mean for reward in rewards]


def completion_text(tokenizer, completion: Completion) -> str:
    """The completion as the task scores it: every generated token decoded (tool calls and outputs included)."""
    return tokenizer.decode(completion.tokens)


def sample_rollout(
    engine,
    task,
    index: int,
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    device_batch_size: int,
    seed_parts: tuple[int, ...],
) -> Rollout:
    """num_samples completions of question `index` of `task`, in passes of at most device_batch_size rows, each
    with a seed from (seed_parts, pass); rewards from task.reward."""
    conversation = task[index]
    prompt = engine.tokenizer.render_for_completion(conversation)
    room = engine.context_len - len(prompt)
    if room < 1:
        raise PicochatError(
            f"{task.name} question {index}: its prompt of {len(prompt)} tokens fills the model's "
            f"context of {engine.context_len} tokens; RL needs a model with a longer context"
        )
    max_new_tokens = min(max_new_tokens, room)
    completions: list[Completion] = []
    for start in range(0, num_samples, device_batch_size):
        count = min(device_batch_size, num_samples - start)
        completions += engine.generate_batch(prompt, num_samples=count, max_tokens=max_new_tokens,
                                             temperature=temperature, top_k=top_k,
                                             seed=rollout_seed(*seed_parts, start))  # fmt: skip
    rewards = [float(task.reward(conversation, completion_text(engine.tokenizer, c))) for c in completions]
    return Rollout(prompt, completions, rewards)


def rollout_tensors(rollout: Rollout, stop_token: int, pad_token: int, device: torch.device | str = "cpu"):
    """(inputs, targets, advantages) for the rollout's samples: rows prompt + completion (+ the stop token when
    the sample stopped: the model must learn when to stop), right-padded with pad_token. targets[t] is the token
    at t+1 where the model sampled it, else -1 (prompt, forced tool output, padding)."""
    sequences, masks = [], []
    for completion in rollout.completions:
        tokens = list(rollout.prompt) + list(completion.tokens)
        mask = [0] * len(rollout.prompt) + list(completion.masks)
        if completion.finish_reason == "stop":
            tokens.append(stop_token)
            mask.append(1)
        sequences.append(tokens)
        masks.append(mask)
    length = max(len(tokens) for tokens in sequences)
    ids = torch.full((len(sequences), length), pad_token, dtype=torch.long)
    supervised = torch.zeros((len(sequences), length), dtype=torch.bool)
    for row, (tokens, mask) in enumerate(zip(sequences, masks)):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        supervised[row, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    inputs = ids[:, :-1]
    targets = torch.where(supervised[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -1))
    advantages = torch.tensor(rollout.advantages, dtype=torch.float32)
    return inputs.to(device), targets.to(device), advantages.to(device)


def policy_gradient_loss(
    model, inputs: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor, normaliser: float
) -> tuple[torch.Tensor, int]:
    """-sum over sampled tokens of advantage x log p(token) / normaliser; and the number of sampled tokens.
    The model's per-token cross-entropy (loss_reduction="none") is -log p, 0 where the target is -1."""
    token_losses = model(inputs, targets, loss_reduction="none")  # (B, T) = -log p, 0 at ignored positions
    valid = targets != -1
    weighted = token_losses * valid * advantages[:, None]  # -log p x A
    return weighted.sum() / normaliser, int(valid.sum())


def pass_at_k(correct: list[list[bool]], k: int) -> float:
    """Fraction of questions with at least one right answer among their first k samples."""
    if not correct:
        return 0.0
    return sum(any(samples[:k]) for samples in correct) / len(correct)
