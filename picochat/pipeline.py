"""`picochat run`: the whole pipeline in one run folder, resumable at any moment.

    data -> tokenizer -> pretrain -> base eval (bpb, CORE) -> SFT -> chat eval -> [RL -> RL eval] -> report

Each stage is the ordinary `picochat <stage>` command, started as a child process (under torchrun when
--nproc-per-node > 1), so a pipeline run is exactly what a user could type by hand, stage by stage.

Resuming is decided from the run folder alone, never from a log:
- a stage is skipped when its output is complete and valid (`stage_complete`): the tokenizer's config.json
  (written last) with the planned vocabulary; a training stage whose latest checkpoint is marked finished; an
  evaluation whose JSON for the stage's final step exists;
- a training stage with a checkpoint that is not finished is continued with `--resume` (exact: same batches,
  optimizer state and RNG), so an interrupted run ends with the same weights and metrics as an uninterrupted one;
- every file the stages write is atomic (temporary file + rename; checkpoints as a folder renamed into place and
  then pointed at), so a kill -9 or a power cut at any moment leaves the previous complete state.

The resolved settings are saved in <run>/pipeline.json on the first run; running again with a different value
for a setting that shapes the results is refused with a one-line error (use another --run). The wall time of
each stage is recorded there too (the report card shows it).

A lock (<run>/.pipeline.lock, flock) keeps two pipelines off one run folder. The stage child inherits it, and
gets SIGTERM if the pipeline dies (Linux), so a child orphaned by a kill -9 of the pipeline saves and exits
before a new pipeline can start on the folder.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from picochat.common import PicochatError, atomic_write_json, log, read_json, typable_command, warn
from picochat.presets import Preset
from picochat.settings import PretrainSettings, RLSettings, SFTSettings, argv

PIPELINE_FILE = "pipeline.json"
LOCK_FILE = ".pipeline.lock"
LOCK_WAIT_SECONDS = 120  # a child of a killed pipeline may still be saving its checkpoint
# Settings that may change between runs of one folder: how many processes run, not what they compute (a resumed
# stage re-plans its accumulation for the new world size and trains the same rows).
CHANGEABLE = {"nproc_per_node"}


@dataclass
class Stage:
    """One step of the plan: a `picochat` command line (argv without the program), and how to run it."""

    name: str
    args: list[str]
    distributed: bool = False  # under torchrun when the preset asks for several processes
    optional: bool = False  # a failure is a warning, not the end of the pipeline (the tokenizer's GPT-2 comparison)


# ----------------------------------------------------------------------------------------------------------
# Completion checks: read only the run folder.


def _read_json(path: Path) -> Any:
    """The file's JSON value, None when it is missing or damaged (then the stage is not complete)."""
    try:
        return read_json(path)
    except PicochatError:
        return None


def training_finished(stage_dir: Path) -> bool:
    """True when the stage's latest checkpoint is its last: step >= its planned steps, or the loop recorded that it
    finished (the data ran out). Only complete checkpoints count (checkpoint.latest_step guarantees that)."""
    from picochat.checkpoint import latest_step

    try:
        step = latest_step(stage_dir)
    except PicochatError:
        return False
    if step is None:
        return False
    meta = _read_json(stage_dir / "state" / f"step_{step:06d}" / "state.json") or {}
    state = meta.get("state", {}) if isinstance(meta, dict) else {}
    settings, loop = state.get("settings", {}), state.get("loop", {})
    planned = settings.get("num_iterations") or settings.get("num_steps")
    return bool(loop.get("finished")) or (isinstance(planned, int) and step >= planned)


def final_step(stage_dir: Path) -> int | None:
    from picochat.checkpoint import latest_step

    try:
        return latest_step(stage_dir)
    except PicochatError:
        return None


def eval_file(run_dir: Path, kind: str, stage: str) -> Path | None:
    """eval/<kind>_<stage>_step<NNNNNN>.json for the stage's final step (None while the stage has no checkpoint)."""
    from picochat.evaluation import result_name

    step = final_step(run_dir / stage)
    return None if step is None else run_dir / "eval" / f"{result_name(kind, stage, step)}.json"


def tokenizer_complete(run_dir: Path, preset: Preset) -> bool:
    config = _read_json(run_dir / "tokenizer" / "config.json")  # written after the tokenizer files
    return (isinstance(config, dict) and config.get("vocab_size_requested") == preset.vocab_size
            and (run_dir / "tokenizer" / "tokenizer.json").is_file())  # fmt: skip


def stage_complete(name: str, run_dir: Path, preset: Preset, state: dict) -> bool:
    if name in ("data", "download", "download-rest", "tokenizer-eval"):
        return state.get("stages", {}).get(name, {}).get("status") == "complete"
    if name == "tokenizer":
        return tokenizer_complete(run_dir, preset)
    if name in ("pretrain", "sft", "rl"):
        return training_finished(run_dir / {"pretrain": "base"}.get(name, name))
    if name in ("base-bpb", "base-core", "sft-eval", "rl-eval"):
        kind, stage = {"base-bpb": ("bpb", "base"), "base-core": ("core", "base"), "sft-eval": ("chat", "sft"),
                       "rl-eval": ("chat", "rl")}[name]  # fmt: skip
        path = eval_file(run_dir, kind, stage)
        return path is not None and isinstance(_read_json(path), dict)
    return False  # the report is rebuilt every time (cheap, and it must show the latest state)


# ----------------------------------------------------------------------------------------------------------
# The plan


def plan_stages(preset: Preset, run_dir: Path, data_dir: Path) -> list[Stage]:
    """The stage commands in order. Training stages get `--resume` when they have a checkpoint to continue."""
    where = ["--run-dir", str(run_dir)]
    data = ["--data-dir", str(data_dir)]
    p = preset
    stages: list[Stage] = []
    if p.download_shards:
        stages.append(Stage("download", ["data", "download", "--dataset", "climbmix", "--num-shards",
                                         str(p.tokenizer_shards or p.download_shards), *data]))  # fmt: skip
    else:
        stages.append(Stage("data", ["data", "check", *data]))
    tokenizer = ["tokenizer", "train", *where, *data, "--vocab-size", str(p.vocab_size),
                 "--max-chars", str(p.tokenizer_max_chars)]  # fmt: skip
    if p.architecture == "portable":  # a split llama.cpp knows, so that the GGUF export tokenises as we do
        tokenizer += ["--split-pattern", "llama-bpe"]
    stages.append(Stage("tokenizer", tokenizer))
    stages.append(Stage("tokenizer-eval", ["tokenizer", "eval", *where, *data], optional=True))

    if latest_checkpoint(run_dir / "base"):
        pretrain = ["pretrain", *where, "--resume"]
    else:
        # A huge --sample-every: greedy samples at the end only (they go into the report).
        pretrain = [
            "pretrain",
            *where,
            *data,
            *argv(*p.stage_settings(PretrainSettings)),
            "--sample-every",
            str(1 << 30),
        ]
    stages.append(Stage("pretrain", pretrain, distributed=True))

    stages.append(Stage("base-bpb", ["eval", "bpb", *where, *data, "--stage", "base", "--tokens", str(p.bpb_tokens)],
                        distributed=True))  # fmt: skip
    core = ["eval", "core", *where, *data, "--stage", "base"]
    if p.core_max_per_task is not None:
        core += ["--max-per-task", str(p.core_max_per_task)]
    stages.append(Stage("base-core", core, distributed=True))

    if latest_checkpoint(run_dir / "sft"):
        sft = ["sft", *where, *data, "--resume"]
    else:
        sft = [
            "sft",
            *where,
            *data,
            "--source",
            "base",
            *argv(*p.stage_settings(SFTSettings)),
            "--save-every",
            str(p.save_every or 1 << 30),
            "--eval-every",
            str(p.eval_every),
        ]
    stages.append(Stage("sft", sft, distributed=True))
    stages.append(Stage("sft-eval", _chat_eval(where, data, "sft", p.chat_eval_tasks, p), distributed=True))

    if p.rl:
        rl = ["rl", *where, *data, "--source", "sft", *argv(*p.stage_settings(RLSettings))]
        if latest_checkpoint(run_dir / "rl"):
            rl.append("--resume")
        stages.append(Stage("rl", rl, distributed=True))
        stages.append(Stage("rl-eval", _chat_eval(where, data, "rl", "GSM8K", p), distributed=True))
    stages.append(Stage("report", ["report", *where]))
    return stages


def _chat_eval(where: list[str], data: list[str], stage: str, tasks: str, p: Preset) -> list[str]:
    args = ["eval", "chat", *where, *data, "--stage", stage, "--tasks", tasks,
            "--max-new-tokens", str(p.chat_eval_max_new_tokens)]  # fmt: skip
    if p.chat_eval_max_problems is not None:
        args += ["--max-problems", str(p.chat_eval_max_problems)]
    return args


def latest_checkpoint(stage_dir: Path) -> bool:
    return final_step(stage_dir) is not None


def command_line(stage: Stage, nproc_per_node: int) -> list[str]:
    """The full argv of a stage's child process."""
    if stage.distributed and nproc_per_node > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
                "-m", "picochat", *stage.args]  # fmt: skip
    return [sys.executable, "-m", "picochat", *stage.args]


def printable(argv: list[str]) -> str:
    """How the user would type it in their shell: `picochat ...` / `torchrun ...` instead of the interpreter path,
    with the environment's full path to them when that environment is not the one on $PATH."""
    if argv[1:3] == ["-m", "torch.distributed.run"]:
        return f"{typable_command('torchrun', 'torch.distributed.run')} {shlex.join(argv[3:])}"
    if argv[1:3] == ["-m", "picochat"]:
        return f"{typable_command()} {shlex.join(argv[3:])}"
    return shlex.join(argv)


# ----------------------------------------------------------------------------------------------------------
# Saved settings and stage times: <run>/pipeline.json


def load_state(run_dir: Path) -> dict:
    path = run_dir / PIPELINE_FILE
    if not path.exists():
        return {}
    state = _read_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("settings"), dict):
        raise PicochatError(f"{path}: unreadable pipeline state; expected a JSON object with \"settings\" "
                            "(delete the file to start the pipeline's bookkeeping over)")  # fmt: skip
    return state


def check_same_settings(state: dict, preset: Preset, run_dir: Path) -> None:
    """A re-run must ask for the same results: a changed setting would mix two runs in one folder."""
    saved = state.get("settings", {})
    for name, value in preset.as_dict().items():
        if name in CHANGEABLE or name not in saved or saved[name] == value:
            continue
        flag = "--" + name.replace("_", "-")
        raise PicochatError(f"{run_dir} was started with {flag} {saved[name]!r}, not {value!r}: run again with the "
                            f"same value, or use another --run")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Running


def _set_parent_death_signal() -> None:
    """In the child, before exec: ask Linux for a SIGTERM when the parent (the pipeline) dies, so a kill -9 of the
    pipeline does not leave a trainer running on its own. Elsewhere this is a no-op."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except OSError:
            pass


def acquire_lock(run_dir: Path) -> int:
    """An exclusive flock on <run>/.pipeline.lock; waits (with a message) while a previous process holds it."""
    import fcntl

    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise PicochatError(f"{run_dir} is in use by another picochat process (it holds {LOCK_FILE}); "
                                    "wait for it to finish or stop it") from None  # fmt: skip
            if not waited:
                log(f"{run_dir} is in use by another picochat process; waiting up to {LOCK_WAIT_SECONDS} s")
                waited = True
            time.sleep(1.0)


def run_stage(stage: Stage, nproc_per_node: int, lock_fd: int) -> int:
    """Run one stage's child to completion. Ctrl-C reaches the child too (same process group): it saves and exits,
    and we wait for it before stopping."""
    argv = command_line(stage, nproc_per_node)
    child = subprocess.Popen(argv, pass_fds=(lock_fd,), preexec_fn=_set_parent_death_signal)
    try:
        return child.wait()
    except KeyboardInterrupt:
        try:
            child.wait(timeout=600)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            child.kill()
        raise


def record(state: dict, run_dir: Path, name: str, **values: Any) -> None:
    state.setdefault("stages", {}).setdefault(name, {}).update(values)
    atomic_write_json(run_dir / PIPELINE_FILE, state)


def run_pipeline(preset: Preset, preset_name: str, run_dir: Path, data_dir: Path) -> int:
    """Run every stage that is not complete yet, in order. Returns 0, or the failing stage's exit status."""
    from picochat import __version__

    run_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = acquire_lock(run_dir)
    try:
        state = load_state(run_dir)
        check_same_settings(state, preset, run_dir)
        state.update(preset=preset_name, settings=preset.as_dict(), data_dir=str(data_dir),
                     picochat_version=__version__)  # fmt: skip
        state.setdefault("stages", {})
        atomic_write_json(run_dir / PIPELINE_FILE, state)
        started = time.perf_counter()
        background: subprocess.Popen | None = None
        for stage in plan_stages(preset, run_dir, data_dir):
            if stage.name == "pretrain" and background is not None:
                _wait_for_download(background)
                background = None
                record(state, run_dir, "download-rest", status="complete")
            if stage_complete(stage.name, run_dir, preset, state):
                log(f"[{stage.name}] complete, skipped")
            else:
                status = _run_and_record(stage, preset, run_dir, data_dir, state, lock_fd)
                if status != 0:
                    if background is not None:
                        background.terminate()
                    return status
            first_shards = preset.tokenizer_shards or preset.download_shards
            if (
                stage.name == "download"
                and preset.download_shards > first_shards
                and not stage_complete("download-rest", run_dir, preset, state)
            ):
                background = _start_background_download(preset, data_dir, run_dir, lock_fd)
        log(f"pipeline finished in {_minutes(time.perf_counter() - started)} (this invocation)")
        return 0
    finally:
        os.close(lock_fd)


def _run_and_record(stage: Stage, preset: Preset, run_dir: Path, data_dir: Path, state: dict, lock_fd: int) -> int:
    """Run one incomplete stage and record its wall time (added up over interrupted attempts)."""
    # Re-plan right before running: a stage before this one may have created what decides --resume.
    stage = next(s for s in plan_stages(preset, run_dir, data_dir) if s.name == stage.name)
    log(f"[{stage.name}] {printable(command_line(stage, preset.nproc_per_node))}")
    started = time.perf_counter()
    previous = state["stages"].get(stage.name, {}).get("seconds", 0.0)
    record(state, run_dir, stage.name, status="running", seconds=previous)  # what a kill -9 leaves behind
    try:
        status = run_stage(stage, preset.nproc_per_node, lock_fd)
    except KeyboardInterrupt:
        status = 130
    seconds = round(previous + time.perf_counter() - started, 1)
    if status == 0:
        record(state, run_dir, stage.name, status="complete", seconds=seconds,
               finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # fmt: skip
        return 0
    if stage.optional:
        warn(f"[{stage.name}] exited with status {status}; continuing (this stage is optional)")
        record(state, run_dir, stage.name, status="failed", seconds=seconds)
        return 0
    record(state, run_dir, stage.name, status="interrupted", seconds=seconds)
    if status in (130, 143, -signal.SIGINT, -signal.SIGTERM):
        log(f"[{stage.name}] interrupted; run the same command again to continue where it stopped")
        return 130
    raise PicochatError(f"stage {stage.name} failed (exit status {status}); fix the problem above and run the same "
                        "command again: finished stages are skipped")  # fmt: skip


def _start_background_download(preset: Preset, data_dir: Path, run_dir: Path, lock_fd: int) -> subprocess.Popen:
    """The rest of the pretraining shards, downloaded while the tokenizer trains (output in <run>/download.log)."""
    argv = [sys.executable, "-m", "picochat", "data", "download", "--dataset", "climbmix", "--num-shards",
            str(preset.download_shards), "--data-dir", str(data_dir)]  # fmt: skip
    log(f"[download] {preset.download_shards} shards in the background (log: {run_dir / 'download.log'})")
    with open(run_dir / "download.log", "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, pass_fds=(lock_fd,),
                                preexec_fn=_set_parent_death_signal)  # fmt: skip


def _wait_for_download(process: subprocess.Popen) -> None:
    log("[download] waiting for the background download to finish before pretraining")
    status = process.wait()
    if status != 0:
        raise PicochatError(f"the background shard download failed (exit status {status}); see download.log in the "
                            "run folder, then run the same command again (complete shards are kept)")  # fmt: skip


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m {seconds % 60:04.1f}s"
