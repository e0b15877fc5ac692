"""CORE: the DCLM in-context-learning score of a base model (22 tasks, centered accuracy, averaged).

The protocol, step by step (it follows the reference evaluator exactly, so that two implementations run on the
same weights agree; steps 1-3 are in core_tasks.py, the rest here):

1. Tasks come from the eval bundle's core.yaml (label, data file, few-shot count, task type, continuation
   delimiter; the delimiter defaults to " "), random baselines from eval_meta_data.csv ("Random baseline", in
   percent). A task's items are its jsonl lines, shuffled with random.Random(1337) and then cut to max_per_task.
2. Few-shot examples for item i (its index in that shuffled, cut list) are random.Random(1234 + i).sample(
   [every other index], k): drawn from the same list, never the item itself.
3. Prompts. Each few-shot example is rendered as its full text -- context, delimiter, gold continuation -- and
   followed by a blank line ("\\n\\n"); then comes the item:
     multiple_choice  one prompt per choice:  shots + query + delimiter + choice
     schema           one prompt per context option:  shots + option + delimiter + continuation
                      (a shot shows its gold option)
     language_model.  shots + context.strip() + delimiter + continuation  (every context is .strip()ped), and
                      the same prompt without the continuation, .strip()ped as a whole
4. Tokens. Every prompt is encoded with BOS prepended. The scored tokens are
     multiple_choice  everything after the longest common token prefix of the choices' prompts
     schema           the longest common token suffix of the options' prompts (the shared continuation)
     language_model.  the tokens after the prompt without continuation (its length; if its tokens are not a
                      prefix of the full prompt's, the common prefix of the two is used instead)
   and always at least the last token of a prompt (a choice that is a token prefix of another, or identical
   options, would otherwise leave nothing to score). A prompt longer than the model's window
   (config.sequence_len) keeps only its last `window` tokens (the BOS and the oldest shots go first); the scored
   range moves with it and is clipped so that the first scored token still has one token before it.
5. Scoring, from one forward pass of each prompt (cross-entropy of each token given the ones before it, from fp32
   logits; the model computes in fp32 on CPU, in its compute dtype (bf16) on modern GPUs):
     multiple_choice, schema  the prompt with the lowest MEAN loss over its scored tokens is the answer (the
                              first one on an exact tie); correct if it is the gold one
     language_modeling        correct if the greedy (argmax) prediction equals every scored token
6. accuracy = correct / items (summed over ranks); centered = (accuracy - b/100) / (1 - b/100) with b the
   random baseline; CORE = the mean centered accuracy over the tasks evaluated. With the shared data only 18 of
   the 22 tasks exist, so the result is labelled "CORE-18" -- never compare it with a 22-task CORE.

Speed, without changing any of the above:
- Only the scored positions go through the lm_head (32,768 x n_embd per position: most of a small model's
  work, and a (B, T, V) logits tensor would not fit in memory for long few-shot prompts).
- A multiple-choice item's choices share their long few-shot context: it is run once into a KV cache and only
  the choices' own tokens are run for each choice (3-4x less work on 10-shot tasks).
- Everything else is batched several items per forward pass, right-padded: causal attention means padding
  after a row's last token cannot change that row, and only real positions are scored.
- Batching changes which kernels run and so the last bits of fp32 results (~1e-6). A decision closer than
  NEAR_TIE (best vs second-best mean loss, or a greedy prediction vs its runner-up) is therefore re-scored with
  the item alone in its forward pass, exactly as with batch size 1. So results do not depend on the batch size
  or the number of ranks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from picochat.common import PicochatError, log, progress, warn
from picochat.evaluation.core_tasks import (
    CoreTask,
    fewshot_indices,
    load_core_tasks,
    load_task_items,
    render_prompts,
    select_items,
    task_data_path,
)

TOTAL_CORE_TASKS = 22  # DCLM's low-variance task list; CORE proper is the mean over all of them
SHARED_CONTEXT_MIN_TOKENS = 64  # below this a shared context is not worth its own forward pass
# Decisions closer than this are re-scored alone (module docstring). fp32 results of different batch shapes differ
# by ~1e-6; bf16/fp16 by up to ~1e-2, where the larger value makes a different decision rare but not impossible.
NEAR_TIE_FP32 = 1e-4
NEAR_TIE_HALF_PRECISION = 0.05


def near_tie_tolerance(dtype: torch.dtype) -> float:
    return NEAR_TIE_FP32 if dtype in (torch.float32, torch.float64) else NEAR_TIE_HALF_PRECISION


# ----------------------------------------------------------------------------------------------------------
# Prompts -> token rows with the range to score


@dataclass
class Row:
    """One prompt's tokens; tokens[start:end] are scored (each given the tokens before it), start >= 1."""

    tokens: list[int]
    start: int
    end: int


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    shortest = min(len(s) for s in sequences)
    first = sequences[0]
    for position in range(shortest):
        if any(s[position] != first[position] for s in sequences):
            return position
    return shortest


def _common_suffix_length(sequences: Sequence[Sequence[int]]) -> int:
    return _common_prefix_length([s[::-1] for s in sequences])


def item_rows(prompt_tokens: list[list[int]], task_type: str, max_tokens: int | None = None) -> list[Row]:
    """Rows with their scored ranges from the BOS-prefixed prompt tokens (module docstring, step 4)."""
    lengths = [len(t) for t in prompt_tokens]
    if task_type == "multiple_choice":
        start = min(_common_prefix_length(prompt_tokens), min(lengths) - 1)
        rows = [Row(list(t), max(start, 1), len(t)) for t in prompt_tokens]
    elif task_type == "schema":
        suffix = max(1, min(_common_suffix_length(prompt_tokens), min(lengths) - 1))
        rows = [Row(list(t), len(t) - suffix, len(t)) for t in prompt_tokens]
    else:
        without, full = prompt_tokens
        start = min(_common_prefix_length([without, full]), len(full) - 1)
        rows = [Row(list(full), max(start, 1), len(full))]
    if max_tokens is not None:
        rows = [_keep_last(row, max_tokens) for row in rows]
    return rows


def _keep_last(row: Row, max_tokens: int) -> Row:
    """Left-truncate to the last max_tokens tokens; the scored range shifts and keeps a token before it."""
    cut = len(row.tokens) - max_tokens
    if cut <= 0:
        return row
    return Row(row.tokens[cut:], max(row.start - cut, 1), row.end - cut)


@dataclass
class RowScore:
    mean_loss: float  # mean cross-entropy (nats) over the scored tokens
    greedy_match: bool  # argmax prediction == every scored token
    greedy_margin: float  # min over scored tokens of (its logit - best other logit): > 0 exactly when it matches


# A scorer turns items (each a list of rows) into scores, one list per item: the model, or a stub in tests.
Scorer = Callable[[list[list[Row]]], list[list[RowScore]]]


# ----------------------------------------------------------------------------------------------------------
# Scoring with the model


class ModelScorer:
    """Scores rows with a GPT: fp32 logits at the scored positions only, items with a long shared context
    through a KV cache, the other items batched together (right-padded with pad_token_id)."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int):
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, items: list[list[Row]]) -> list[list[RowScore]]:
        scores: list[list[RowScore] | None] = [None] * len(items)
        batched = []
        for index, rows in enumerate(items):
            context = _shared_context_length(rows)
            if context >= SHARED_CONTEXT_MIN_TOKENS and hasattr(self.model, "new_kv_cache"):
                scores[index] = self._score_with_shared_context(rows, context)
            else:
                batched.append(index)
        if batched:
            flat_scores = self._score_rows([row for index in batched for row in items[index]])
            offset = 0
            for index in batched:
                scores[index] = flat_scores[offset : offset + len(items[index])]
                offset += len(items[index])
        return scores  # type: ignore[return-value]

    def _logits_at(self, inputs: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, kv_cache=None):
        """fp32 logits (N, V) at (rows[k], positions[k]) of the batch `inputs`.

        The lm_head is applied to the selected positions only: a forward pre-hook hands it just those hidden
        states (the model's forward then soft-caps them as usual). A model without an lm_head gets a full
        forward and is indexed afterwards.
        """
        head = getattr(self.model, "lm_head", None)
        if not isinstance(head, torch.nn.Module):
            return self.model(inputs, kv_cache=kv_cache)[rows, positions].float()

        def select(module, args):
            return (args[0][rows, positions].unsqueeze(0),)

        handle = head.register_forward_pre_hook(select)
        try:
            logits = self.model(inputs, kv_cache=kv_cache)
        finally:
            handle.remove()
        return logits[0].float()

    def _score_rows(self, rows: list[Row]) -> list[RowScore]:
        """One right-padded forward pass over all rows."""
        width = max(len(row.tokens) for row in rows)
        inputs = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        row_index, positions, targets = [], [], []
        for r, row in enumerate(rows):
            inputs[r, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
            # The logits at position p predict token p + 1: the scored tokens start..end-1 are read at start-1..end-2.
            row_index += [r] * (row.end - row.start)
            positions += range(row.start - 1, row.end - 1)
            targets += row.tokens[row.start : row.end]
        logits = self._logits_at(
            inputs.to(self.device),
            torch.tensor(row_index, device=self.device),
            torch.tensor(positions, device=self.device),
        )
        counts = [row.end - row.start for row in rows]
        return _summarize(logits, torch.tensor(targets, device=self.device), counts)

    def _score_with_shared_context(self, rows: list[Row], context: int) -> list[RowScore]:
        """The rows share tokens[:context] and all score from `context` on: run the context once into a KV cache,
        then every row's own tokens as a batch continuing from that cache."""
        model = self.model
        tails = [row.tokens[context : row.end - 1] for row in rows]  # inputs after the context; the last token
        tail_width = max(len(tail) for tail in tails)  # of a row is only a target
        one = model.new_kv_cache(1, context)
        prefix = torch.tensor([rows[0].tokens[:context]], dtype=torch.long, device=self.device)
        last = torch.tensor([context - 1], device=self.device)
        first_logits = self._logits_at(prefix, torch.zeros_like(last), last, kv_cache=one)  # predicts token `context`
        logits = [first_logits.expand(len(rows), -1)]
        row_index = []
        positions = []
        if tail_width:
            cache = model.new_kv_cache(len(rows), context + tail_width)
            cache.keys[:, :, :context] = one.keys[:, :, :context]  # broadcast the one cached row to every row
            cache.values[:, :, :context] = one.values[:, :, :context]
            cache.position = context
            cache.prev_embedding = one.prev_embedding.expand(len(rows), -1, -1)
            inputs = torch.full((len(rows), tail_width), self.pad_token_id, dtype=torch.long)
            for r, tail in enumerate(tails):
                inputs[r, : len(tail)] = torch.tensor(tail, dtype=torch.long)
                row_index += [r] * len(tail)
                positions += range(len(tail))
            if row_index:
                logits.append(
                    self._logits_at(
                        inputs.to(self.device),
                        torch.tensor(row_index, device=self.device),
                        torch.tensor(positions, device=self.device),
                        kv_cache=cache,
                    )
                )
        # Reorder into row-major order: row r's first scored token (from the context), then its tail's.
        order, targets, tail_offset = [], [], len(rows)
        for r, row in enumerate(rows):
            order.append(r)
            order += range(tail_offset, tail_offset + len(tails[r]))
            tail_offset += len(tails[r])
            targets += row.tokens[context : row.end]
        all_logits = torch.cat(logits)[torch.tensor(order, device=self.device)]
        return _summarize(all_logits, torch.tensor(targets, device=self.device), [row.end - context for row in rows])


def _shared_context_length(rows: list[Row]) -> int:
    """The length of the context the rows share and do not score (0 if they do not all start scoring at the
    same place after the same tokens, or if there is only one row)."""
    start = rows[0].start
    if len(rows) < 2 or any(row.start != start for row in rows):
        return 0
    first = rows[0].tokens[:start]
    if any(row.tokens[:start] != first for row in rows[1:]):
        return 0
    return start


def _summarize(logits: torch.Tensor, targets: torch.Tensor, counts: list[int]) -> list[RowScore]:
    """Per row (consecutive groups of `counts` positions): mean loss, greedy match and greedy margin."""
    losses = F.cross_entropy(logits, targets, reduction="none")
    target_logits = logits.gather(1, targets[:, None])[:, 0]
    others = logits.scatter(1, targets[:, None], float("-inf"))
    margins = target_logits - others.max(dim=1).values
    matches = logits.argmax(dim=1) == targets
    scores = []
    for loss, match, margin in zip(losses.split(counts), matches.split(counts), margins.split(counts)):
        scores.append(RowScore(loss.mean().item(), bool(match.all()), margin.min().item()))
    return scores


# ----------------------------------------------------------------------------------------------------------
# Decisions, tasks, CORE


def is_correct(task_type: str, item: dict, scores: list[RowScore]) -> bool:
    if task_type == "language_modeling":
        return scores[0].greedy_match
    losses = [score.mean_loss for score in scores]
    return losses.index(min(losses)) == item["gold"]  # the first of equal losses, like list.index


def is_near_tie(task_type: str, scores: list[RowScore], tolerance: float) -> bool:
    """Could float noise of the size `tolerance` change this item's decision?"""
    if task_type == "language_modeling":
        return abs(scores[0].greedy_margin) < tolerance
    losses = sorted(score.mean_loss for score in scores)
    return len(losses) > 1 and losses[1] - losses[0] < tolerance


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """0 at the random baseline (percent), 1 at perfect accuracy."""
    chance = 0.01 * random_baseline
    return (accuracy - chance) / (1.0 - chance)


@dataclass
class TaskResult:
    label: str
    task_type: str
    num_fewshot: int
    examples: int
    accuracy: float
    centered: float
    random_baseline: float
    seconds: float
    correct: list[bool] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_type": self.task_type,
            "num_fewshot": self.num_fewshot,
            "examples": self.examples,
            "accuracy": self.accuracy,
            "centered": self.centered,
            "random_baseline": self.random_baseline,
            "seconds": round(self.seconds, 3),
        }


def evaluate_task(
    scorer: Scorer,
    tokenizer: Any,
    task: CoreTask,
    items: list[dict],
    *,
    max_tokens: int | None = None,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    near_tie: float = NEAR_TIE_FP32,
    device: torch.device | str = "cpu",
) -> TaskResult:
    """Accuracy of one task over `items` (already selected). Rank r scores items r, r + N, ...; the per-item
    correctness is summed over ranks, so every rank returns the same result."""
    started = time.perf_counter()
    mine = list(range(rank, len(items), world_size))
    shots_per_item = [[items[j] for j in fewshot_indices(i, len(items), task.num_fewshot)] for i in mine]
    prompts = [render_prompts(items[i], task, shots) for i, shots in zip(mine, shots_per_item)]
    flat_tokens = tokenizer.encode([p for group in prompts for p in group], prepend=tokenizer.bos_token_id)
    rows_per_item, offset = [], 0
    for group in prompts:
        rows_per_item.append(item_rows(flat_tokens[offset : offset + len(group)], task.task_type, max_tokens))
        offset += len(group)
    # Similar lengths side by side waste less padding; the order cannot change any result.
    order = sorted(range(len(mine)), key=lambda k: sum(len(row.tokens) for row in rows_per_item[k]))

    correct = torch.zeros(len(items), dtype=torch.float64)
    bar = progress(total=len(items), desc=task.label, unit="item")
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        batch_scores = scorer([rows_per_item[k] for k in batch])
        for k, scores in zip(batch, batch_scores):
            if len(batch) > 1 and is_near_tie(task.task_type, scores, near_tie):
                scores = scorer([rows_per_item[k]])[0]  # alone in its forward pass, as with batch size 1
            correct[mine[k]] = float(is_correct(task.task_type, items[mine[k]], scores))
        bar.update(len(batch) * world_size)
    bar.close()
    if world_size > 1:
        import torch.distributed as dist

        total = correct.to(device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        correct = total.cpu()
    accuracy = correct.sum().item() / len(items)
    return TaskResult(
        task.label,
        task.task_type,
        task.num_fewshot,
        len(items),
        accuracy,
        centered_accuracy(accuracy, task.random_baseline),
        task.random_baseline,
        time.perf_counter() - started,
        [bool(c) for c in correct.tolist()],
    )


@dataclass
class CoreResult:
    tasks: list[TaskResult]
    missing: list[str]  # labels of core.yaml whose data file is not in the bundle
    max_per_task: int | None
    seconds: float

    @property
    def core(self) -> float:
        return sum(t.centered for t in self.tasks) / len(self.tasks) if self.tasks else float("nan")

    @property
    def label(self) -> str:
        """ "CORE" for all 22 tasks, else "CORE-<n>" so nobody mistakes it for the published metric."""
        count = len(self.tasks)
        return "CORE" if count == TOTAL_CORE_TASKS else f"CORE-{count}"

    @property
    def examples(self) -> int:
        return sum(t.examples for t in self.tasks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.label,
            "core": self.core,
            "tasks_evaluated": len(self.tasks),
            "tasks_total": TOTAL_CORE_TASKS,
            "missing_tasks": self.missing,
            "max_per_task": self.max_per_task,
            "examples": self.examples,
            "seconds": round(self.seconds, 2),
            "tasks": {t.label: t.to_dict() for t in self.tasks},
        }


def evaluate_core(
    model: torch.nn.Module,
    tokenizer: Any,
    core_dir: str | os.PathLike,
    *,
    tasks: Sequence[str] | None = None,
    max_per_task: int | None = None,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    scorer: Scorer | None = None,
) -> CoreResult:
    """CORE over the tasks named (default: every task of core.yaml whose data file exists; a named task whose
    file is missing is an error). Prompts are cut to the model's window (config.sequence_len)."""
    started = time.perf_counter()
    core_dir = Path(core_dir)
    all_tasks = load_core_tasks(core_dir)
    by_label = {task.label: task for task in all_tasks}
    if tasks:
        unknown = [name for name in tasks if name not in by_label]
        if unknown:
            raise PicochatError(f"--tasks: unknown task {unknown[0]!r}; known: {', '.join(by_label)}")
        chosen = [by_label[name] for name in dict.fromkeys(tasks)]
        for task in chosen:
            if not task_data_path(core_dir, task).is_file():
                raise PicochatError(f"task {task.label}: data file {task_data_path(core_dir, task)} not found")
        missing = []
    else:
        chosen = [task for task in all_tasks if task_data_path(core_dir, task).is_file()]
        missing = [task.label for task in all_tasks if task not in chosen]
        if missing:
            warn(f"{len(missing)} of {len(all_tasks)} CORE tasks have no data in {core_dir}: {', '.join(missing)}")
    if not chosen:
        raise PicochatError(f"{core_dir}: none of the CORE task files exist under eval_data/")

    device = next(model.parameters()).device
    dtype = getattr(model, "compute_dtype", torch.float32)
    near_tie = near_tie_tolerance(dtype)
    scorer = scorer or ModelScorer(model, pad_token_id=tokenizer.bos_token_id)
    max_tokens = getattr(getattr(model, "config", None), "sequence_len", None)
    results = []
    for task in chosen:
        items = select_items(load_task_items(task_data_path(core_dir, task), task.task_type), max_per_task)
        result = evaluate_task(
            scorer,
            tokenizer,
            task,
            items,
            max_tokens=max_tokens,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            near_tie=near_tie,
            device=device,
        )
        log(
            f"{task.label:<34} {task.num_fewshot:>2}-shot {task.task_type:<17} accuracy {result.accuracy:.4f} "
            f"centered {result.centered:+.4f} ({result.examples} items, {result.seconds:.1f}s)"
        )
        results.append(result)
    return CoreResult(
        results, missing, max_per_task if max_per_task and max_per_task > 0 else None, time.perf_counter() - started
    )


def core_csv(result: CoreResult) -> str:
    """Task, accuracy, centered accuracy and item count per task, then the CORE line (the reference's CSV plus
    a column)."""
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}, Examples"]
    for task in result.tasks:
        lines.append(f"{task.label:<35}, {task.accuracy:<10.6f}, {task.centered:<10.6f}, {task.examples}")
    lines.append(f"{result.label:<35}, {'':<10}, {result.core:<10.6f}, {result.examples}")
    return "\n".join(lines) + "\n"
