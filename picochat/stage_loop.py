"""What every training loop of a stage shares (the Trainer of pretraining and SFT, and RL): its files and its resume.

- metrics.jsonl (rank 0): on resume, the events after the resumed step (they belong to the interrupted run) are
  dropped, so that the file describes one run; then events are appended, one JSON object per line.
- A clean stop: SIGINT / SIGTERM finish the current step, save a checkpoint and exit. The loop polls
  `_stop_signal` (and agrees on it over ranks with `_any_rank`).
- Checkpoints (picochat.checkpoint; rank 0 writes): the weights, and as training state the FULL optimizer state
  (MuonAdamW.state_dict is collective: every rank calls it), the RNG states, what the loop adds (its counters, the
  loader state) and the settings a resume must agree with.
- Restore: refuses a checkpoint whose settings differ from this run's, then loads weights, optimizer and RNG.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from picochat.checkpoint import Checkpoint, save_checkpoint
from picochat.common import PicochatError, atomic_write_text, log
from picochat.hardware import Distributed, is_distributed


class StageLoop:
    """model and optimizer: what the stage trains. resume_settings: values a resume must match (saved in every
    checkpoint, compared on resume). resume_hint: the command that continues the run. wandb_run: also log train
    and eval events to Weights & Biases."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        stage_dir: str | os.PathLike,
        ranks: Distributed,
        resume_settings: dict[str, Any] | None = None,
        resume_hint: str = "",
        wandb_run: str | None = None,
        wandb_project: str = "picochat",
        wandb_config: dict[str, Any] | None = None,
    ):
        self.model, self.optimizer = model, optimizer
        self.stage_dir = Path(stage_dir)
        self.ranks = ranks
        self.resume_settings = dict(resume_settings or {})
        self.resume_hint = resume_hint
        self.wandb_run, self.wandb_project, self.wandb_config = wandb_run, wandb_project, wandb_config or {}
        self.step = 0
        self._stop_signal: int | None = None
        self._metrics_file = None
        self._wandb = None

    # ---- resume and checkpoints ------------------------------------------------------------------------

    def _restore_state(self, checkpoint: Checkpoint) -> dict[str, Any]:
        """Check the checkpoint's settings against this run's, load weights, optimizer and RNG, and take its step.
        Returns its training state, for what the loop saved of its own."""
        state = checkpoint.training_state
        saved = state.get("settings", {})
        for key, value in self.resume_settings.items():
            if key in saved and saved[key] != value:
                raise PicochatError(
                    f"{checkpoint.path}: cannot resume, it was trained with {key}={saved[key]!r} and this run has "
                    f"{key}={value!r} (resume with the same value, or start a new run)"
                )
        try:
            self.model.load_state_dict(checkpoint.model_state, strict=True)
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0]
            raise PicochatError(f"{checkpoint.path}: the weights do not fit this model ({first})") from None
        self.optimizer.load_state_dict(state["optimizer"])
        rng = state.get("rng", {})
        if "torch_cpu" in rng:
            torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and self.ranks.device.type == "cuda":
            torch.cuda.set_rng_state(rng["torch_cuda"], self.ranks.device)
        self.step = checkpoint.step
        return state

    def _write_checkpoint(self, optimizer_state: dict, keep: int, *, settings: dict[str, Any], **state: Any) -> None:
        """Rank 0, after the collectives: the checkpoint of the current step, with the RNG states, `settings`
        (next to resume_settings) and the loop's own `state` (e.g. loop=..., loader=...)."""
        rng = {"torch_cpu": torch.get_rng_state()}
        if self.ranks.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.ranks.device)
        training_state = {
            "optimizer": optimizer_state,
            **state,
            "rng": rng,
            "settings": {**self.resume_settings, **settings},
        }
        folder = save_checkpoint(self.stage_dir, self.step, self.model.state_dict(), training_state, keep=keep)
        self._write_metrics({"event": "checkpoint", "step": self.step, "path": str(folder)})

    def _any_rank(self, flag: bool) -> bool:
        if not is_distributed():
            return flag
        votes = torch.tensor(float(flag), device=self.ranks.device)
        dist.all_reduce(votes)
        return votes.item() > 0

    # ---- metrics and signals ---------------------------------------------------------------------------

    def _open_metrics(self) -> None:
        """metrics.jsonl (rank 0), cut back to the events up to the resumed step; and Weights & Biases if asked."""
        if not self.ranks.is_main:
            return
        path = self.stage_dir / "metrics.jsonl"
        kept = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    if self.step > 0 and json.loads(line).get("step", 0) <= self.step:
                        kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self._metrics_file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by _close_metrics)
        if self.wandb_run:  # optional, imported only when asked for
            try:
                import wandb
            except ImportError:
                raise PicochatError("--wandb-run needs the wandb package (pip install wandb)") from None
            self._wandb = wandb.init(project=self.wandb_project, name=self.wandb_run, config=self.wandb_config)

    def _write_metrics(self, event: dict[str, Any]) -> None:
        if self._metrics_file is None:
            return
        self._metrics_file.write(json.dumps(event) + "\n")
        self._metrics_file.flush()
        if self._wandb is not None and event["event"] in ("train", "eval"):
            if event["event"] == "eval" or event["step"] % 10 == 0:
                numbers = {k: v for k, v in event.items() if isinstance(v, (int, float)) and k != "step"}
                self._wandb.log({f"{event['event']}/{k}": v for k, v in numbers.items()}, step=event["step"])

    def _close_metrics(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
        if self._wandb is not None:
            self._wandb.finish()

    def _install_signal_handlers(self) -> Callable[[], None]:
        """SIGINT / SIGTERM: finish the current step, save, exit cleanly. A second Ctrl-C aborts at once (a
        SIGTERM after the first signal is ignored: torchrun sends one to its workers after a Ctrl-C)."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):
            if self._stop_signal is not None:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                return
            self._stop_signal = signum
            log(f"{signal.Signals(signum).name}: finishing step {self.step + 1:,}, then saving a checkpoint "
                "(Ctrl-C again to abort without saving)")  # fmt: skip

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

    def _stopped_message(self, saved: bool, planned: int) -> None:
        """The line a run stopped by a signal ends with: where it stopped and how to continue."""
        name = signal.Signals(self._stop_signal).name
        what = "a checkpoint is saved" if saved else "nothing new to save"
        log(
            f"stopped by {name} at step {self.step:,} of {planned:,}; {what}. "
            f"Continue with: {self.resume_hint or '--resume'}"
        )
