"""picochat: train your own small ChatGPT end to end, on one CPU or many GPUs.

Importing the package does no work: every module imports its heavy dependencies (torch, pyarrow, ...) only
where it needs them, so `picochat --help` stays fast. The two names of the Python API are loaded on first use:

    import picochat
    model, tokenizer = picochat.load("myrun")          # the newest trained stage of runs/myrun
    engine = picochat.Engine(model, tokenizer)
    for piece in engine.stream_chat([{"role": "user", "content": "Why is the sky blue?"}]):
        print(piece.text, end="", flush=True)
"""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"


def load(
    run_or_path: str | os.PathLike,
    *,
    stage: str | None = None,
    step: int | None = None,
    device: str | None = None,
    compute_dtype=None,
):
    """(model, tokenizer) of a trained run, ready for inference (eval mode, weights in the compute dtype).

    run_or_path: a run name (a folder under $PICOCHAT_HOME/runs), a run folder, or a stage folder (e.g.
        runs/myrun/sft). stage: "base", "sft", "rl", ... (default: the newest stage with weights).
    step: a saved checkpoint step of that stage (default: its latest weights). device: default the best present.
    compute_dtype: a torch dtype (default: the device's compute dtype, bf16 on recent GPUs, fp32 on CPU).
    """
    from picochat.checkpoint import load_model
    from picochat.common import PicochatError
    from picochat.engine import prepare_for_inference
    from picochat.tokenizer import Tokenizer

    run_dir, stage_dir = locate_stage(run_or_path, stage)
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    model = load_model(stage_dir, device=device, step=step, compute_dtype=compute_dtype)
    if tokenizer.vocab_size > model.config.vocab_size:  # its ids past the embedding would fail mid-reply
        raise PicochatError(f"{run_dir / 'tokenizer'}: {tokenizer.vocab_size} tokens, but the model in {stage_dir} "
                            f"has {model.config.vocab_size} (vocab_size in its config.json)")  # fmt: skip
    return prepare_for_inference(model, compute_dtype, copy=False), tokenizer


def load_engine(
    run: str | None = None,
    run_dir: str | os.PathLike | None = None,
    *,
    stage: str | None = None,
    step: int | None = None,
    device: str | None = None,
    tool: str = "calculator",
):
    """(engine, run folder, stage folder): the model --run/--run-dir/--stage/--step name, on `device`, in an Engine
    that runs `tool` (tools.tool_named). `picochat chat` and `picochat serve` load their model this way."""
    from picochat.common import PicochatError, resolve_run_dir
    from picochat.engine import Engine
    from picochat.hardware import check_device
    from picochat.tools import tool_named

    check_device(device)
    run_dir = resolve_run_dir(run, run_dir)
    if not run_dir.is_dir():
        raise PicochatError(f"{run_dir}: no such run folder (train one with `picochat pretrain`)")
    _, stage_dir = locate_stage(run_dir, stage)
    model, tokenizer = load(stage_dir, step=step, device=device)
    return Engine(model, tokenizer, tool=tool_named(tool)), run_dir, stage_dir


def load_for_evaluation(
    run: str | None, run_dir: str | os.PathLike | None, stage: str | None, step: int | None, device
):
    """(run folder, stage name, step, model, tokenizer) for `picochat eval`: the model as training left it (its
    fp32 master weights, computing in the device's dtype), not converted for inference as load() does."""
    from picochat.checkpoint import find_stage_dir, latest_step, load_model
    from picochat.common import PicochatError, log, resolve_run_dir
    from picochat.tokenizer import Tokenizer

    run_dir = resolve_run_dir(run, run_dir)
    if not run_dir.is_dir():
        raise PicochatError(f"run folder {run_dir} does not exist (give --run NAME or --run-dir PATH)")
    stage_dir = find_stage_dir(run_dir, stage)
    model = load_model(stage_dir, device=device, step=step)  # None: the stage's model.safetensors
    step = step if step is not None else latest_step(stage_dir)
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise PicochatError(
            f"{run_dir / 'tokenizer'}: vocabulary of {tokenizer.vocab_size} tokens, but the model in "
            f"{stage_dir} has {model.config.vocab_size}"
        )
    log(f"evaluating {stage_dir} at step {step if step is not None else '(latest weights)'} on {device}")
    return run_dir, stage_dir.name, step, model, tokenizer


def locate_stage(run_or_path: str | os.PathLike, stage: str | None = None) -> tuple[Path, Path]:
    """(run folder, stage folder) for a run name, a run folder or a stage folder."""
    from picochat.checkpoint import find_stage_dir
    from picochat.common import PicochatError, picochat_home, resolve_run_dir

    path = Path(run_or_path).expanduser()
    if not path.is_dir():
        name = str(run_or_path)
        if "/" in name or os.sep in name or not (picochat_home() / "runs" / name).is_dir():
            raise PicochatError(f"{name}: neither a folder nor a run in {picochat_home() / 'runs'}")
        path = resolve_run_dir(run=name)
    if _is_stage_folder(path):  # the loader then names whichever of its files is missing or damaged
        if stage is not None and stage != path.name:
            raise PicochatError(f"{path} is the {path.name!r} stage folder, but stage {stage!r} was asked for")
        return path.parent, path
    return path, find_stage_dir(path, stage)


def _is_stage_folder(path: Path) -> bool:
    """A stage folder (runs/<run>/sft, ...) rather than a run folder: it has its weights or its config.json in
    place (a run folder has neither at its top), or a stage's name and checkpoints."""
    from picochat.checkpoint import STAGE_ORDER

    if os.path.lexists(path / "model.safetensors") or os.path.lexists(path / "config.json"):
        return True
    return path.name in STAGE_ORDER and (path / "state").is_dir()


def __getattr__(name: str):
    # `picochat.Engine` without importing torch when the package is imported.
    if name == "Engine":
        from picochat.engine import Engine

        return Engine
    raise AttributeError(f"module 'picochat' has no attribute {name!r}")
