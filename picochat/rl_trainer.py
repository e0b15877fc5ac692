"""The RL loop (the algorithm's pieces are picochat/rl.py), on the machinery every training stage shares
(picochat/stage_loop.py): metrics.jsonl cut back on resume, a clean stop on SIGINT/SIGTERM, checkpoints with the
full optimizer state and RNG, and the resume checks.

Step s (0-based) trains on questions s x E .. s x E + E - 1 of the training set (E = examples_per_step over all
ranks; rank r takes every world_size-th of them), each sampled num_samples times through the Engine. One optimizer
step per RL step; LR x (1 - s / num_steps) (the groups' initial_lr already holds init_lr_frac). Every eval_every
steps and at the end: pass@k on eval_examples test questions at temperature 1. The data position and the sampling
seeds follow from the step, so a checkpoint (weights, optimizer, RNG, step) continues exactly.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

from picochat.checkpoint import Checkpoint
from picochat.common import log
from picochat.hardware import is_distributed
from picochat.rl import pass_at_k, policy_gradient_loss, rollout_tensors, sample_rollout
from picochat.stage_loop import StageLoop


class RLTrainer(StageLoop):
    """settings: the stage's RLSettings (picochat/settings.py); fixed: the names a resume must keep."""

    def __init__(
        self,
        model,
        optimizer,
        tokenizer,
        train_task,
        test_task,
        settings: Any,
        num_steps: int,
        *,
        fixed: tuple[str, ...],
        **loop_options: Any,
    ):
        super().__init__(
            model, optimizer, resume_settings={name: getattr(settings, name) for name in fixed}, **loop_options
        )
        self.tokenizer, self.train_task, self.test_task = tokenizer, train_task, test_task
        self.settings, self.num_steps = settings, num_steps
        self.top_k = settings.top_k or None
        self.last_eval_step = -1  # the eval of the resumed step is not run again (its event is kept)
        self.engine = None

    def restore(self, checkpoint: Checkpoint) -> None:
        state = self._restore_state(checkpoint)
        self.last_eval_step = state.get("loop", {}).get("last_eval_step", -1)
        log(f"resumed from {checkpoint.path} at step {self.step:,}")

    def run(self) -> int:
        """Train to num_steps, or until stopped by a signal. Returns the last step."""
        from picochat.engine import Engine

        opts = self.settings
        self.engine = Engine(self.model, self.tokenizer)
        self._open_metrics()
        restore_signals = self._install_signal_handlers()
        first_step = self.step
        try:
            while True:
                last = self.step == self.num_steps or self._stop_signal is not None
                due = opts.eval_every and self.step % opts.eval_every == 0 or self.step == self.num_steps
                if due and self.last_eval_step != self.step and self._stop_signal is None:
                    scores = self.evaluate()
                    self.last_eval_step = self.step
                    self._write_metrics({"event": "eval", "step": self.step, **scores})
                    log(f"step {self.step:,}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
                periodic = opts.save_every and self.step % opts.save_every == 0
                if self.step > first_step and (last or periodic):
                    self.save()
                if last:
                    break
                event = self._train_step()
                self._write_metrics(event)
                log(
                    f"step {self.step:,}/{self.num_steps:,}: mean reward {event['mean_reward']:.3f}, "
                    f"loss {event['loss']:.4f}, {event['step_seconds']:.1f}s"
                )
        finally:
            restore_signals()
            self._close_metrics()
        if self._stop_signal is not None:
            self._stopped_message(self.step > first_step, self.num_steps)
        return self.step

    def _all_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.ranks.device)
        if is_distributed():
            dist.all_reduce(tensor)
        return tensor.tolist()

    def evaluate(self) -> dict[str, float]:
        """pass@k on the first eval_examples test questions (ranks stride), at temperature 1."""
        opts, ranks = self.settings, self.ranks
        correct = []
        for index in range(ranks.rank, min(opts.eval_examples, len(self.test_task)), ranks.world_size):
            rollout = sample_rollout(
                self.engine,
                self.test_task,
                index,
                num_samples=opts.eval_samples,
                max_new_tokens=opts.max_new_tokens,
                temperature=1.0,
                top_k=self.top_k,
                device_batch_size=opts.device_batch_size,
                seed_parts=(-1, index),
            )
            correct.append([reward > 0 for reward in rollout.rewards])
        counts = self._all_sum(
            [len(correct)] + [pass_at_k(correct, k) * len(correct) for k in range(1, opts.eval_samples + 1)]
        )
        return {f"pass@{k}": counts[k] / max(counts[0], 1) for k in range(1, opts.eval_samples + 1)}

    def _train_step(self) -> dict[str, Any]:
        opts, ranks, model, step = self.settings, self.ranks, self.model, self.step
        start = time.perf_counter()
        lr_multiplier = 1.0 - step / self.num_steps
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
        stop_token = self.tokenizer.encode_special("<|assistant_end|>")
        examples_per_rank = opts.examples_per_step // ranks.world_size
        passes = math.ceil(opts.num_samples / opts.device_batch_size)
        rewards, loss_total, sampled_tokens = [], 0.0, 0
        for local in range(examples_per_rank):
            position = step * opts.examples_per_step + local * ranks.world_size + ranks.rank
            index = position % len(self.train_task)
            model.eval()
            rollout = sample_rollout(
                self.engine,
                self.train_task,
                index,
                num_samples=opts.num_samples,
                max_new_tokens=opts.max_new_tokens,
                temperature=opts.temperature,
                top_k=self.top_k,
                device_batch_size=opts.device_batch_size,
                seed_parts=(step, position),
            )
            rewards += rollout.rewards
            model.train()
            inputs, targets, advantages = rollout_tensors(rollout, stop_token, stop_token, ranks.device)
            for begin in range(0, len(inputs), opts.device_batch_size):
                rows = slice(begin, begin + opts.device_batch_size)
                valid = max(int((targets[rows] != -1).sum()), 1)
                loss, count = policy_gradient_loss(
                    model, inputs[rows], targets[rows], advantages[rows], valid * passes * examples_per_rank
                )
                loss.backward()
                loss_total += float(loss.detach())
                sampled_tokens += count
        self.optimizer.step()
        model.zero_grad(set_to_none=True)
        self.engine.sync_weights()
        # One all-reduce for the step's numbers and "should we stop" (a signal may reach only some ranks).
        reward_sum, reward_count, loss_sum, tokens, stop_votes = self._all_sum(
            [sum(rewards), len(rewards), loss_total, sampled_tokens, float(self._stop_signal is not None)]
        )
        if stop_votes > 0 and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM  # another rank was asked to stop
        self.step += 1
        return {
            "event": "train",
            "step": self.step,
            "mean_reward": reward_sum / max(reward_count, 1),
            "loss": loss_sum / ranks.world_size,
            "sampled_tokens": int(tokens),
            "lr_multiplier": lr_multiplier,
            "step_seconds": round(time.perf_counter() - start, 3),
        }

    def save(self) -> None:
        """Checkpoint at the current step. Collective: every rank calls it; rank 0 writes."""
        optimizer_state = self.optimizer.state_dict()  # collective
        if not self.ranks.is_main:
            return
        from picochat.settings import as_flags

        loop = {"last_eval_step": self.last_eval_step, "finished": self.step >= self.num_steps}
        self._write_checkpoint(
            optimizer_state,
            self.settings.keep_checkpoints,
            loop=loop,
            settings={**as_flags(self.settings), "num_steps": self.num_steps},
        )
