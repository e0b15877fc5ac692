"""The training loop, shared by pretraining and SFT: accumulation, schedules, evaluation, metrics, checkpoints,
exact resume, a clean stop on SIGINT/SIGTERM, and 1..N ranks under torchrun.

One optimizer step ("step") consumes `total_batch_size` tokens over all ranks:

    total_batch_size = device_batch_size x seq_len x world_size x accumulation

Each rank runs `accumulation` forward/backward passes ("micro-steps") of device_batch_size rows, then the
optimizer (MuonAdamW) averages the gradients over ranks and updates the weights. There is no DDP wrapper.

Loss normalisation. A step's loss is the mean over every counted target of the step (target != -1), on every
rank. The micro-batches of a step are fetched first, their targets counted and the count summed over ranks
(`count`); each micro-batch then backpropagates sum(token losses) x world_size / count. The optimizer's average
over ranks divides by world_size again, so the gradient is exactly d(sum of all token losses / count): the same
for any (world size, accumulation) split, and right for SFT, where micro-batches hold different numbers of
supervised targets. For pretraining (no -1 targets) it is the plain mean.

Same rows for any split. The loaders (picochat.packing) are built with num_streams = total_batch_size / seq_len:
an optimizer step always takes one row from each stream, whichever rank and micro-step packs it. Each micro-step
has a loader of its own, as a "virtual rank": micro-step m of rank r is virtual rank v = m x world_size + r of
world_size x accumulation, and packs the streams s with s % (world_size x accumulation) == v. So 2 ranks x 1
micro-step and 1 rank x 2 micro-steps not only train on the same rows, they group them into the same micro-batches
and compute bit for bit the same gradients (on CPU; the averaging over ranks is exact, see above). Any other split
trains on the same rows too, up to float rounding. A checkpoint holds the merged state of every stream, so it
resumes on any number of ranks and micro-steps.

Step numbering. "Step s" means "after s optimizer steps". The loop, for s = start .. num_iterations:
    evaluate (every eval_every steps and at the end), sample (every sample_every steps), save (every save_every
    steps, at the end, and when stopping); at s = num_iterations stop; else train step s+1 with the schedules
    evaluated at s (0-based, as the reference does).

Checkpoints, metrics.jsonl, the clean stop on a signal and the resume checks are picochat/stage_loop.py's (shared
with RL); the Trainer adds the merged loader state of all ranks and its loop counters, so a resume continues
exactly: same rows, same optimizer moments, same schedules.

Performance. One host sync per step (the loss .item()); the next step's batches are fetched right after the
last backward, before the optimizer step (on a GPU the kernels are still running); gc is frozen and disabled
after the first step, as the reference does (its pauses cost ~0.5 s on big runs), with a collect every 5,000
steps. On CPU there is no overlap to win, but no copy is made either: the loaders hand over tensors in place.
With compile on, every train event records `compiled_graphs` (graphs torch.compile has made so far): it must stop
growing after the first step, or something recompiles as training goes.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from picochat.checkpoint import Checkpoint
from picochat.common import PicochatError, compile_backend, log, progress, read_jsonl, warn
from picochat.evaluation.bpb import evaluate_bpb
from picochat.hardware import Distributed, is_distributed, peak_flops, peak_memory_bytes
from picochat.stage_loop import StageLoop

GC_EVERY = 5000  # steps between manual garbage collections once gc is frozen
UNTIMED_STEPS = 10  # the first steps (compilation, warm-up) do not count towards the training time


@dataclass
class TrainSettings:
    """What the loop needs to know; the stage derives the values (pretrain: from --depth, see its module)."""

    total_batch_size: int  # tokens per optimizer step, all ranks together
    device_batch_size: int  # rows per forward pass on one rank
    seq_len: int  # tokens per row
    num_iterations: int  # optimizer steps
    # Learning rate: linear warmup, flat, linear warmdown to a fraction (multiplies every group's initial_lr).
    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05
    # Muon momentum: start -> peak over momentum_warmup_steps, then -> final during the LR warmdown.
    momentum_start: float = 0.85
    momentum_peak: float = 0.97
    momentum_warmup_steps: int = 400
    momentum_final: float = 0.90
    cosine_weight_decay: bool = True  # Muon weight decay: cosine from its initial value to 0 over the run
    # Cadence (0 = only at the end for eval/save, never for samples).
    eval_every: int = 250
    eval_tokens: int = 80 * 524_288
    sample_every: int = 2000
    save_every: int = 0
    keep_checkpoints: int = 2
    compile: bool = False
    wandb_run: str | None = None
    wandb_project: str = "picochat"


# ----------------------------------------------------------------------------------------------------------
# Schedules: pure functions of the step (0-based index of the update being made). Where two ramps overlap (runs
# shorter than warmup + warmdown), the smaller value wins, so a short run still warms up and still cools down.


def lr_multiplier(step: int, num_iterations: int, warmup_steps: int, warmdown_ratio: float, final_lr_frac: float):
    """(step + 1) / warmup_steps during warmup; 1.0; then linear to final_lr_frac over the last warmdown_ratio
    of the run (reaching it at step num_iterations)."""
    multiplier = 1.0
    if warmup_steps > 0:
        multiplier = min(multiplier, (step + 1) / warmup_steps)
    warmdown_steps = round(warmdown_ratio * num_iterations)
    if warmdown_steps > 0 and step > num_iterations - warmdown_steps:
        remaining = (num_iterations - step) / warmdown_steps  # 1 -> 0 over the warmdown
        multiplier = min(multiplier, remaining + (1 - remaining) * final_lr_frac)
    return multiplier


def muon_momentum(step: int, num_iterations: int, warmdown_ratio: float, start: float = 0.85, peak: float = 0.97,
                  warmup_steps: int = 400, final: float = 0.90) -> float:  # fmt: skip
    """start -> peak linearly over warmup_steps, flat, then peak -> final linearly during the LR warmdown.
    (Low momentum early: the first gradients are big and noisy; lower again at the end: the warmdown anneals.)"""
    momentum = peak if warmup_steps <= 0 else start + (peak - start) * min(step / warmup_steps, 1.0)
    warmdown_steps = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_steps
    if warmdown_steps > 0 and step > warmdown_start:
        fall = peak + (final - peak) * (step - warmdown_start) / warmdown_steps
        momentum = min(momentum, fall)
    return momentum


def weight_decay_multiplier(step: int, num_iterations: int) -> float:
    """Cosine from 1 at step 0 to 0 at num_iterations (Muon's weight decay fades out over the run)."""
    return 0.5 * (1 + math.cos(math.pi * min(step, num_iterations) / max(num_iterations, 1)))


# ----------------------------------------------------------------------------------------------------------
# Accumulation


def gradient_accumulation_steps(total_batch_size: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    """total_batch_size / (device_batch_size x seq_len x world_size), which must be a whole number >= 1.
    Otherwise a PicochatError suggesting the nearest valid total and device batch sizes."""
    per_micro_step = device_batch_size * seq_len * world_size
    if per_micro_step > 0 and total_batch_size % per_micro_step == 0 and total_batch_size >= per_micro_step:
        return total_batch_size // per_micro_step
    ranks = f" x {world_size} ranks" if world_size > 1 else ""
    message = (
        f"--total-batch-size {total_batch_size:,} tokens is not a whole number of micro-steps of "
        f"--device-batch-size {device_batch_size} x --max-seq-len {seq_len}{ranks} = {per_micro_step:,} tokens"
    )
    below = total_batch_size // per_micro_step * per_micro_step
    totals = [n for n in (below, below + per_micro_step) if n > 0]
    suggestions = ["--total-batch-size " + " or ".join(f"{n:,}" for n in totals)]
    row_tokens = seq_len * world_size
    if total_batch_size % row_tokens == 0:
        rows_per_rank = total_batch_size // row_tokens
        divisors = [d for d in range(1, rows_per_rank + 1) if rows_per_rank % d == 0]
        nearest = [max([d for d in divisors if d <= device_batch_size], default=None),
                   min([d for d in divisors if d >= device_batch_size], default=None)]  # fmt: skip
        nearest = sorted({d for d in nearest if d is not None})
        suggestions.append("--device-batch-size " + " or ".join(map(str, nearest)))
    else:
        message += f" (and not a multiple of --max-seq-len{ranks} = {row_tokens:,})"
    raise PicochatError(f"{message}; try {', or '.join(suggestions)}")


# ----------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class StepBatch:
    """The micro-batches of one optimizer step on this rank, and what was counted over all ranks."""

    micro_batches: list[tuple[torch.Tensor, torch.Tensor]]
    count: torch.Tensor  # targets != -1 over all micro-batches and ranks (int64, on the device)
    loader_states: list[Any]  # the state of each of this rank's loaders (one per micro-step) after this step
    exhausted: bool  # a loader ran out (SFT with loop=False): the run ends here. Agreed over ranks by the caller.


class Trainer(StageLoop):
    """model: the GPT (fp32 masters); optimizer: its MuonAdamW. make_train_loader / make_val_loader are called with
    keyword arguments batch_size, seq_len, rank, world_size (+ num_streams, state for training) and return
    iterators of (inputs, targets, state) -- e.g. functools.partial(packing.pretraining_batches, files, tokenizer,
    device=...). sample(model) -> [(prompt, completion)] runs on rank 0. resume_settings: values a resume must
    match (saved in every checkpoint, compared on resume). resume_hint: the command that continues the run.
    Metrics, signals, checkpoints and their checks are picochat.stage_loop's, shared with RL."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        settings: TrainSettings,
        *,
        stage_dir: str | os.PathLike,
        ranks: Distributed,
        make_train_loader: Callable[..., Iterator],
        make_val_loader: Callable[..., Iterator] | None = None,
        token_bytes: torch.Tensor | None = None,
        sample: Callable[[torch.nn.Module], list[tuple[str, str]]] | None = None,
        resume_settings: dict[str, Any] | None = None,
        resume_hint: str = "",
        wandb_config: dict[str, Any] | None = None,
    ):
        super().__init__(
            model,
            optimizer,
            stage_dir=stage_dir,
            ranks=ranks,
            resume_hint=resume_hint,
            resume_settings={
                **(resume_settings or {}),
                "total_batch_size": settings.total_batch_size,
                "seq_len": settings.seq_len,
            },
            wandb_run=settings.wandb_run,
            wandb_project=settings.wandb_project,
            wandb_config=wandb_config,
        )
        self.settings = settings
        self.make_train_loader, self.make_val_loader = make_train_loader, make_val_loader
        self.token_bytes = token_bytes.to(ranks.device) if token_bytes is not None else None
        self.sample = sample
        self.accumulation = gradient_accumulation_steps(
            settings.total_batch_size, settings.device_batch_size, settings.seq_len, ranks.world_size
        )
        self.num_streams = settings.total_batch_size // settings.seq_len
        # Virtual ranks (see the module docstring): micro-step m of this rank packs as rank m * world + rank.
        self.virtual_world = ranks.world_size * self.accumulation
        self.virtual_ranks = [m * ranks.world_size + ranks.rank for m in range(self.accumulation)]
        self.flops_per_token = model.flops_per_token(settings.seq_len)
        self.peak_flops = peak_flops(ranks.device)
        for group in optimizer.param_groups:  # the schedules scale these
            group.setdefault("initial_lr", group["lr"])
            group.setdefault("initial_weight_decay", group["weight_decay"])
        # Loop state (saved in checkpoints).
        self.loader_state = None  # merged state of all loaders (from a checkpoint): where the loaders start
        self.loader_states: list[Any] = []  # this rank's loaders' states after the last step trained
        self.smooth_loss = 0.0  # EMA(0.9) of the loss, debiased when reported
        self.training_seconds = 0.0  # wall time of steps after the first UNTIMED_STEPS, without evals/saves
        self.min_val_bpb = float("inf")
        self.last_eval_step = self.last_sample_step = -1
        self._data_exhausted = False  # the training data ran out: the stage is over even before num_iterations
        self._started = time.perf_counter()

    # ---- resume ----------------------------------------------------------------------------------------

    def restore(self, checkpoint: Checkpoint) -> None:
        """Load a checkpoint into the model, optimizer and loop (call before run()); checks compatibility."""
        state = self._restore_state(checkpoint)
        saved = state.get("settings", {})
        if saved.get("num_iterations") not in (None, self.settings.num_iterations):
            warn(f"resuming a run planned for {saved['num_iterations']} steps with {self.settings.num_iterations}: "
                 "the learning-rate schedule changes from here on")  # fmt: skip
        loop = state["loop"]
        self.loader_state = state.get("loader")
        self.smooth_loss = loop["smooth_loss"]
        self.training_seconds = loop["training_seconds"]
        self.min_val_bpb = loop["min_val_bpb"] if loop["min_val_bpb"] is not None else float("inf")
        self.last_eval_step, self.last_sample_step = loop["last_eval_step"], loop["last_sample_step"]
        log(f"resumed from {checkpoint.path} at step {self.step:,}")

    # ---- the loop --------------------------------------------------------------------------------------

    def run(self) -> int:
        """Train to num_iterations (or until stopped by a signal or the data ending). Returns the last step."""
        settings = self.settings
        self.train_model = self.model
        if settings.compile:
            self.train_model = torch.compile(self.model, dynamic=False, backend=compile_backend())
        loaders = self._loaders(self.make_train_loader, state=self.loader_state)
        self._open_metrics()
        restore_signals = self._install_signal_handlers()
        bar = progress(total=settings.num_iterations, desc="train", unit="step")
        bar.update(self.step)
        first_step, self._started = self.step, time.perf_counter()
        try:
            batch = None
            if self.step < settings.num_iterations:
                batch = self._fetch(loaders)
                batch.exhausted = self._any_rank(batch.exhausted)
            while True:
                self._data_exhausted = batch is not None and batch.exhausted
                stopping = self._stop_signal is not None or self._data_exhausted
                last = self.step >= settings.num_iterations or stopping
                if not stopping and self._evaluate_and_sample(last):
                    # A signal may arrive during a (long) evaluation, which then stops early: agree on it.
                    if self._any_rank(self._stop_signal is not None) and self._stop_signal is None:
                        self._stop_signal = signal.SIGTERM
                    last = last or self._stop_signal is not None
                periodic = settings.save_every > 0 and self.step % settings.save_every == 0
                if (last or periodic) and self.step > first_step:
                    self.save()
                if last:
                    break
                batch, metrics = self._train_step(batch, loaders)
                self._write_metrics(metrics)
                bar.update(1)
                bar.set_postfix_str(self._postfix(metrics), refresh=False)  # printed at the bar's own pace
                if self.step == first_step + 1:
                    gc.collect()
                    gc.freeze()  # everything alive now stays: later collections skip it
                    gc.disable()
                elif self.step % GC_EVERY == 0:
                    gc.collect()
        finally:
            bar.close()
            restore_signals()
            gc.enable()
            gc.unfreeze()
            self._close_metrics()
        if self._stop_signal is not None:
            self._stopped_message(self.step > first_step, settings.num_iterations)
        elif self.step < settings.num_iterations:
            saved = "a checkpoint is saved" if self.step > first_step else "nothing new to save"
            log(f"the training data ran out at step {self.step:,}; {saved}")
        return self.step

    def _loaders(self, make_loader: Callable[..., Iterator], **extra) -> list[Iterator]:
        """One loader per micro-step, each a virtual rank of world_size x accumulation with num_streams streams."""
        return [make_loader(batch_size=self.settings.device_batch_size, seq_len=self.settings.seq_len, rank=v,
                            world_size=self.virtual_world, num_streams=self.num_streams, **extra)
                for v in self.virtual_ranks]  # fmt: skip

    def _fetch(self, loaders: list[Iterator]) -> StepBatch:
        """The next step's micro-batches, with the count of targets summed over ranks (an all-reduce that needs
        no host sync). `exhausted` is this rank's alone; the caller agrees on it with the other ranks."""
        micro_batches, states, exhausted = [], [], False
        for loader in loaders:
            try:
                inputs, targets, state = next(loader)
            except StopIteration:
                exhausted = True
                break
            micro_batches.append((inputs, targets))
            states.append(state)
        counted = [(targets != -1).sum() for _, targets in micro_batches]
        count = torch.stack(counted).sum() if counted else torch.zeros((), dtype=torch.int64, device=self.ranks.device)
        if is_distributed():
            dist.all_reduce(count)
        return StepBatch(micro_batches, count, states, exhausted)

    def _train_step(self, batch: StepBatch, loaders: list[Iterator]) -> tuple[StepBatch | None, dict[str, Any]]:
        settings, step = self.settings, self.step
        start = time.perf_counter()
        lrm = lr_multiplier(step, settings.num_iterations, settings.warmup_steps, settings.warmdown_ratio,
                            settings.final_lr_frac)  # fmt: skip
        momentum = muon_momentum(
            step,
            settings.num_iterations,
            settings.warmdown_ratio,
            settings.momentum_start,
            settings.momentum_peak,
            settings.momentum_warmup_steps,
            settings.momentum_final,
        )
        decay = weight_decay_multiplier(step, settings.num_iterations) if settings.cosine_weight_decay else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = momentum
                group["weight_decay"] = group["initial_weight_decay"] * decay

        # sum(token losses) x world / count per micro-batch: see the module docstring.
        scale = (self.ranks.world_size / batch.count.clamp(min=1)).float()
        loss_sum = torch.zeros((), device=self.ranks.device)
        for inputs, targets in batch.micro_batches:
            loss = self.train_model(inputs, targets, loss_reduction="sum")
            (loss * scale).backward()
            loss_sum += loss.detach()
        self.loader_states = batch.loader_states
        next_batch = self._fetch(loaders) if step + 1 < settings.num_iterations else None  # prefetch
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)

        # One all-reduce and one host sync for: the global loss, "should we stop" (a signal may reach only some
        # ranks) and "did a loader run out" while prefetching.
        flags = [self._stop_signal is not None, next_batch is not None and next_batch.exhausted]
        reduced = torch.cat([loss_sum.view(1), torch.tensor(flags, dtype=torch.float32, device=self.ranks.device)])
        if is_distributed():
            dist.all_reduce(reduced)
        reduced[0] /= batch.count.clamp(min=1)
        loss_value, stop_votes, exhausted_votes = reduced.tolist()
        if stop_votes > 0 and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM  # another rank was asked to stop
        if next_batch is not None:
            next_batch.exhausted = exhausted_votes > 0
        seconds = time.perf_counter() - start
        self.step += 1
        if self.step > UNTIMED_STEPS:
            self.training_seconds += seconds
        steps_done = self.step - 1
        self.smooth_loss = 0.9 * self.smooth_loss + 0.1 * loss_value
        tokens_per_second = settings.total_batch_size / seconds
        mfu = None
        if self.peak_flops:
            mfu = self.flops_per_token * tokens_per_second / (self.peak_flops * self.ranks.world_size)
        metrics = {
            "event": "train",
            "step": self.step,
            "loss": loss_value,
            "smooth_loss": self.smooth_loss / (1 - 0.9 ** (steps_done + 1)),
            "lr_multiplier": lrm,
            "muon_momentum": momentum,
            "step_seconds": round(seconds, 4),
            "tokens_per_second": round(tokens_per_second, 1),
            "mfu": None if mfu is None else round(mfu, 5),
            "peak_memory_bytes": peak_memory_bytes(self.ranks.device),
            "training_seconds": round(self.training_seconds, 3),
        }
        if settings.compile:
            metrics["compiled_graphs"] = compiled_graph_count()
        return next_batch, metrics

    # ---- evaluation and samples ------------------------------------------------------------------------

    def _evaluate_and_sample(self, last: bool) -> bool:
        """Evaluate and sample if due at this step. Returns whether a validation ran."""
        settings, step = self.settings, self.step
        due = lambda every: (every > 0 and step % every == 0) or last  # noqa: E731
        evaluated = False
        if self.make_val_loader is not None and due(settings.eval_every) and self.last_eval_step != step:
            evaluated = True
            start = time.perf_counter()
            bpb = self.evaluate()
            if self._stop_signal is not None:  # cut short by a signal: not a measurement, redo it on resume
                return evaluated
            self.last_eval_step = step
            self.min_val_bpb = min(self.min_val_bpb, bpb)
            self._write_metrics({"event": "eval", "step": step, "val_bpb": bpb,
                                 "eval_seconds": round(time.perf_counter() - start, 3)})  # fmt: skip
            log(f"step {step:,}: validation bpb {bpb:.4f}")
        sample_due = settings.sample_every > 0 and (step % settings.sample_every == 0 or last)
        if self.sample is not None and sample_due and self.last_sample_step != step:
            self.last_sample_step = step
            if self.ranks.is_main:
                samples = self.sample(self.model)
                self._write_metrics({"event": "sample", "step": step,
                                     "samples": [{"prompt": p, "completion": c} for p, c in samples]})  # fmt: skip
                for prompt, completion in samples:
                    log(f"sample: {prompt!r} -> {completion!r}")
        return evaluated

    def evaluate(self) -> float:
        """Validation bits per byte over eval_tokens, rounded down to whole steps of total_batch_size (at least
        one). Fresh loaders every time, laid out like the training loaders: the same rows for any split."""
        if self.token_bytes is None:
            raise ValueError("Trainer.evaluate needs token_bytes")
        loaders = self._loaders(self.make_val_loader)
        steps = max(1, self.settings.eval_tokens // self.settings.total_batch_size)

        def batches():
            for index in range(steps):
                if index > 0 and self._stop_signal is not None:  # stop early (evaluate_bpb's one all-reduce
                    return  # still matches on every rank)
                for loader in loaders:
                    batch = next(loader, None)
                    if batch is None:  # a validation set smaller than eval_tokens (loop=False)
                        return
                    yield batch[0], batch[1]

        return evaluate_bpb(self.model, batches(), self.token_bytes)

    # ---- checkpoints -----------------------------------------------------------------------------------

    def save(self) -> None:
        """Checkpoint at the current step. Collective: every rank calls it; rank 0 writes."""
        optimizer_state = self.optimizer.state_dict()  # collective: gathers every rank's shard
        gathered = [self.loader_states]
        if is_distributed():
            gathered = [None] * self.ranks.world_size if self.ranks.is_main else None
            dist.gather_object(self.loader_states, gathered, dst=0)  # in-memory transport only; we write no pickle
        if not self.ranks.is_main:
            return
        from picochat.packing import merge_loader_states

        states = [state for rank_states in gathered for state in rank_states]
        loop = {
            "smooth_loss": self.smooth_loss,
            "training_seconds": self.training_seconds,
            "min_val_bpb": None if math.isinf(self.min_val_bpb) else self.min_val_bpb,
            "last_eval_step": self.last_eval_step,
            "last_sample_step": self.last_sample_step,
            # Whether this checkpoint ends the stage (`picochat run` skips a finished stage).
            "finished": self.step >= self.settings.num_iterations or self._data_exhausted,
        }
        settings = {
            "num_iterations": self.settings.num_iterations,
            "world_size": self.ranks.world_size,
            "device_batch_size": self.settings.device_batch_size,
        }
        loader = merge_loader_states(states) if states else self.loader_state
        self._write_checkpoint(
            optimizer_state, self.settings.keep_checkpoints, settings=settings, loader=loader, loop=loop
        )

    # ---- metrics and progress -------------------------------------------------------------------------

    def _write_metrics(self, event: dict[str, Any]) -> None:
        event["elapsed_seconds"] = round(time.perf_counter() - self._started, 3)  # since this process started
        super()._write_metrics(event)

    def _postfix(self, metrics: dict[str, Any]) -> str:
        remaining = self.settings.num_iterations - self.step
        eta = remaining * metrics["step_seconds"]
        mfu = "" if metrics["mfu"] is None else f" mfu {100 * metrics['mfu']:.1f}%"
        return (f"loss {metrics['smooth_loss']:.4f} tok/s {metrics['tokens_per_second']:,.0f}{mfu} "
                f"eta {eta / 60:.1f}m")  # fmt: skip


def compiled_graph_count() -> int | None:
    """Graphs torch.compile has produced in this process so far (every recompile adds one). The first step compiles
    the model and one update function per parameter shape; a count that still grows after it means something
    recompiles every few steps, which on a GPU costs far more than it saves."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # a torch without Dynamo's counters: not reported
        return None
    return int(counters["stats"]["unique_graphs"])


def read_metrics(stage_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The events of a stage's metrics.jsonl, in order (for reports, scripts and tests)."""
    return [event for _, event in read_jsonl(Path(stage_dir) / "metrics.jsonl")]
