"""Checkpoints: weights in safetensors, everything else in JSON, written so that a crash never loses one.

Layout inside a stage folder (e.g. runs/<run>/base/):

    model.safetensors            weights of the latest checkpoint (what eval, chat and export read)
    config.json                  written by the stage: model shape, flags, provenance
    state/step_000500/           one complete resumable checkpoint
        model.safetensors        fp32 master weights
        state.safetensors        every tensor of the training state (optimizer moments, RNG, loader buffers)
        state.json               everything else (step, loader cursor, counters), with the tensors' places marked
    state/latest.json            {"step": 500} -- the pointer that makes a checkpoint count

Why this shape:
- Atomic: a checkpoint is written into `state/step_000500.tmp-<pid>/`, fsynced, renamed to its final name, and only
  then does `latest.json` (itself replaced atomically) point at it. A kill -9 or power loss at any moment leaves the
  previous checkpoint intact and `latest.json` naming a complete one; leftover `.tmp-*` folders are ignored and
  cleaned on the next save.
- No pickle: nested training state (dicts and lists of tensors, numpy arrays and plain values) is split by
  `flatten_state` into a flat {name: tensor} dict for safetensors and a JSON skeleton with {"__tensor__": name}
  markers; `unflatten_state` puts it back together.
- World-size independent: callers hand over full (unsharded) state, so a checkpoint written by 2 ranks resumes on 1
  rank and vice versa. Only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from picochat.common import PicochatError, atomic_write_json, read_json

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_TENSOR_MARK = "__tensor__"
_NUMPY_MARK = "__numpy__"


# ----------------------------------------------------------------------------------------------------------
# Nested state <-> (flat tensors, JSON skeleton)


def flatten_state(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split nested state into a JSON-able skeleton and a flat dict of tensors.

    Tensors become {"__tensor__": name}; numpy arrays become {"__numpy__": name} (so they come back as numpy).
    Dict keys must be strings (JSON); ints are allowed and restored (optimizer state is keyed by index).
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous()
            return {_TENSOR_MARK: path}
        if isinstance(value, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(value))
            return {_NUMPY_MARK: path}
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    raise TypeError(f"state key {key!r} at {path or '<root>'} must be str or int")
                # Integer keys are tagged so they round-trip through JSON, where keys are always strings.
                json_key = f"__int__{key}" if isinstance(key, int) else key
                out[json_key] = walk(item, f"{path}.{key}" if path else str(key))
            return out
        if isinstance(value, (list, tuple)):
            return [walk(item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(value)]
        if isinstance(value, (np.integer, np.floating)):
            return value.item()
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        raise TypeError(f"cannot checkpoint a {type(value).__name__} at {path or '<root>'}")

    return walk(state, prefix), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of flatten_state."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR_MARK}:
            return tensors[skeleton[_TENSOR_MARK]]
        if set(skeleton) == {_NUMPY_MARK}:
            return tensors[skeleton[_NUMPY_MARK]].numpy()
        out: dict[Any, Any] = {}
        for key, item in skeleton.items():
            real_key: Any = int(key[len("__int__") :]) if key.startswith("__int__") else key
            out[real_key] = unflatten_state(item, tensors)
        return out
    if isinstance(skeleton, list):
        return [unflatten_state(item, tensors) for item in skeleton]
    return skeleton


# ----------------------------------------------------------------------------------------------------------
# Save / load


@dataclass
class Checkpoint:
    step: int
    model_state: dict[str, torch.Tensor]
    training_state: Any  # whatever the trainer saved: optimizer, loader, RNG, counters (tensors restored)
    path: Path


def _step_dir(stage_dir: Path, step: int) -> Path:
    return stage_dir / "state" / f"step_{step:06d}"


def save_checkpoint(
    stage_dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    training_state: Any,
    *,
    keep: int = 2,
) -> Path:
    """Write one complete checkpoint atomically and make it the latest. Returns its folder.

    `keep` most recent checkpoints are kept (older ones are removed after the new one is in place).
    """
    stage_dir = Path(stage_dir)
    final_dir = _step_dir(stage_dir, step)
    tmp_dir = final_dir.with_name(f"{final_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)

    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model_state.items()}
    save_file(weights, str(tmp_dir / "model.safetensors"))
    skeleton, tensors = flatten_state(training_state)
    save_file(tensors, str(tmp_dir / "state.safetensors"))
    with open(tmp_dir / "state.json", "w", encoding="utf-8") as f:
        json.dump({"step": step, "state": skeleton}, f)
    for name in ("model.safetensors", "state.safetensors", "state.json"):
        with open(tmp_dir / name, "rb") as f:
            os.fsync(f.fileno())

    if final_dir.exists():  # re-saving the same step (e.g. resumed and stopped again): replace it whole
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    # The top-level model.safetensors is the copy readers (eval, chat, export) load. It is replaced BEFORE the
    # pointer moves: a kill between the two leaves the pointer on the previous step (the resume redoes this step
    # and this copy), never a finished stage whose weights file is one checkpoint behind.
    _atomic_copy(final_dir / "model.safetensors", stage_dir / "model.safetensors")
    atomic_write_json(stage_dir / "state" / "latest.json", {"step": step})
    _prune(stage_dir, keep=keep, protect=step)
    return final_dir


def _atomic_copy(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.copyfile(source, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


def _prune(stage_dir: Path, *, keep: int, protect: int) -> None:
    state_dir = stage_dir / "state"
    for leftover in state_dir.glob("step_*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    steps = sorted(available_steps(stage_dir))
    for step in steps[: max(0, len(steps) - max(keep, 1))]:
        if step != protect:
            shutil.rmtree(_step_dir(stage_dir, step), ignore_errors=True)


def available_steps(stage_dir: str | os.PathLike) -> list[int]:
    """Steps with a complete checkpoint folder (temporary folders are not complete)."""
    state_dir = Path(stage_dir) / "state"
    if not state_dir.is_dir():
        return []
    steps = []
    for child in state_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "state.json").is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_step(stage_dir: str | os.PathLike) -> int | None:
    """The step `latest.json` points at, or None when the stage has no checkpoint yet."""
    pointer = Path(stage_dir) / "state" / "latest.json"
    if not pointer.is_file():
        return None
    try:
        step = json.loads(pointer.read_text(encoding="utf-8"))["step"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PicochatError(f'{pointer}: unreadable checkpoint pointer ({error}); expected {{"step": N}}') from None
    if not isinstance(step, int) or step not in available_steps(stage_dir):
        raise PicochatError(f"{pointer}: points at step {step!r}, which has no complete checkpoint")
    return step


def resume_point(stage_dir: str | os.PathLike, resume: str | int | None, *, holds: str) -> int | None:
    """The step a training stage starts from. `resume` is --resume's value: None (a fresh start, refused when the
    stage already has a checkpoint: `holds` names what it holds, e.g. "an RL run"), "latest", or a step, which
    must have a complete checkpoint."""
    stage_dir = Path(stage_dir)
    if resume is None:
        if latest_step(stage_dir) is not None:
            raise PicochatError(f"{stage_dir} already holds {holds} (checkpoint at step {latest_step(stage_dir)}); "
                                "continue it with --resume, or use another --run")  # fmt: skip
        return None
    step = latest_step(stage_dir) if resume == "latest" else resume
    if step is None or step not in available_steps(stage_dir):
        have = ", ".join(map(str, available_steps(stage_dir))) or "none"
        raise PicochatError(f"--resume: no checkpoint {'' if step is None else f'at step {step} '}in {stage_dir} "
                            f"(available steps: {have})")  # fmt: skip
    return step


def load_checkpoint(stage_dir: str | os.PathLike, step: int | None = None) -> Checkpoint:
    """Load the checkpoint at `step` (default: the latest). Tensors come back on the CPU."""
    folder = _checkpoint_folder(Path(stage_dir), step)
    model_state = load_weights(folder / "model.safetensors")
    meta = _read_step_meta(folder)
    tensors_file = folder / "state.safetensors"
    _require_file(tensors_file, "training state")
    try:
        tensors = load_file(str(tensors_file))
        training_state = unflatten_state(meta["state"], tensors)
    except (OSError, ValueError, SafetensorError) as error:
        raise PicochatError(f"{tensors_file}: damaged checkpoint ({_one_line(error)})") from None
    except KeyError as error:
        raise PicochatError(f"{folder / 'state.json'}: names tensor {error} that {tensors_file.name} lacks") from None
    return Checkpoint(step=meta["step"], model_state=model_state, training_state=training_state, path=folder)


def _checkpoint_folder(stage_dir: Path, step: int | None) -> Path:
    """The folder of checkpoint `step` (default: the one latest.json points at), which must be complete."""
    if step is None:
        step = latest_step(stage_dir)
        if step is None:
            raise PicochatError(f"{stage_dir}: no checkpoint found (expected {stage_dir / 'state' / 'latest.json'})")
    folder = _step_dir(stage_dir, step)
    if not (folder / "state.json").is_file():
        have = ", ".join(map(str, available_steps(stage_dir))) or "none"
        raise PicochatError(f"{stage_dir}: no checkpoint at step {step} (available: {have})")
    return folder


def _read_step_meta(folder: Path) -> dict[str, Any]:
    """state.json of a checkpoint folder, checked: an object whose "step" is the folder's step, with "state"."""
    path = folder / "state.json"
    meta = read_json(path)
    step = int(_STEP_DIR.match(folder.name).group(1))
    if not isinstance(meta, dict) or "state" not in meta:
        raise PicochatError(f'{path}: expected a JSON object with "step" and "state" (a damaged checkpoint)')
    if meta.get("step") != step or isinstance(meta.get("step"), bool):
        raise PicochatError(f'{path}: "step" is {meta.get("step")!r}, but the folder is step {step}')
    return meta


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights only, from a stage folder (its model.safetensors) or a .safetensors file."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() and path.suffix != ".safetensors" else path
    _require_file(file, "weights")
    try:
        return load_file(str(file))
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise PicochatError(f"{file}: damaged weights file ({_one_line(error)})") from None


def _require_file(path: Path, what: str) -> None:
    """A one-line error unless `path` is a regular file (a folder or a missing file in its place is not)."""
    if path.is_dir():
        raise PicochatError(f"{path}: is a folder, expected the {what} file")
    if not path.is_file():
        problem = "not a regular file" if os.path.lexists(path) else "not found"
        raise PicochatError(f"{path}: {problem} (expected the {what} file)")


def _one_line(error: BaseException) -> str:
    """An underlying library's message on one line (the CLI prints one line per error)."""
    return " ".join(str(error).split())


# ----------------------------------------------------------------------------------------------------------
# Building a trained model from a stage folder. Every training stage writes <stage_dir>/config.json with the
# model's shape under the key "model" (GPTConfig.to_dict()) next to its weights; this is the one reader of that.

STAGE_ORDER = ("rl", "sft", "mid", "base")  # later stages first: the default model of a run is its newest stage


def read_stage_config(stage_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(stage_dir) / "config.json"
    if not os.path.lexists(path):
        raise PicochatError(f"{path}: not found (is {Path(stage_dir)} a trained stage folder?)")
    _require_file(path, "stage config")
    config = read_json(path)
    if not isinstance(config, dict) or not isinstance(model_shape(config), dict):
        raise PicochatError(f'{path}: expected a JSON object with the model shape under "model"')
    return config


def model_shape(config: dict[str, Any]) -> dict[str, Any] | None:
    """The GPT config of a stage's config.json: "model", or (older pretraining configs) derived.model_config."""
    return config.get("model") or (config.get("derived") or {}).get("model_config")


def provenance(device, dtype, world_size: int, use_compile: bool, resume_from: int | None) -> dict[str, Any]:
    """Where a training stage's config.json came from: versions, git commit, command, device and ranks."""
    import subprocess
    import sys
    import time

    from picochat import __version__

    commit = None
    try:
        result = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=5)  # fmt: skip
        if result.returncode == 0:
            commit = result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "picochat_version": __version__,
        "git_commit": commit,
        "torch_version": torch.__version__,
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "world_size": world_size,
        "compile": use_compile,
        "resumed_from_step": resume_from,
    }


def has_weights(stage_dir: str | os.PathLike) -> bool:
    """Whether a stage folder holds (something in the place of) its weights. A folder or a damaged file there
    counts: choosing the stage makes the loader report it, rather than silently loading an older stage."""
    return os.path.lexists(Path(stage_dir) / "model.safetensors")


def find_stage_dir(run_dir: str | os.PathLike, stage: str | None = None) -> Path:
    """The stage folder to load from a run: `stage` if given, else the newest stage that has weights (a stage
    still training, with its config.json but no weights yet, is passed over for the one before it)."""
    run_dir = Path(run_dir)
    if stage is not None:
        if stage not in STAGE_ORDER:
            raise PicochatError(f"--stage {stage!r}: expected one of {', '.join(STAGE_ORDER)}")
        if not has_weights(run_dir / stage):
            raise PicochatError(f"{run_dir / stage}: no trained model there (model.safetensors missing)")
        return run_dir / stage
    for name in STAGE_ORDER:
        if has_weights(run_dir / name):
            return run_dir / name
    raise PicochatError(f"{run_dir}: no trained model in any stage ({', '.join(STAGE_ORDER)}); run `picochat pretrain`")


def load_model(
    stage_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    step: int | None = None,
    compute_dtype: torch.dtype | None = None,
):
    """A GPT with the stage's weights (the latest, or those of checkpoint `step`), in eval mode.

    Built on the meta device and materialised directly on `device` (no throw-away random init on the CPU).
    """
    from picochat.gpt import GPT, GPTConfig, model_class
    from picochat.hardware import autodetect_device

    stage_dir = Path(stage_dir)
    config_file = stage_dir / "config.json"
    config = GPTConfig.from_dict(model_shape(read_stage_config(stage_dir)), source=str(config_file))
    if step is None:
        weights_file = stage_dir / "model.safetensors"
    else:
        folder = _checkpoint_folder(stage_dir, step)
        _read_step_meta(folder)
        weights_file = folder / "model.safetensors"
    weights = load_weights(weights_file)
    with torch.device("meta"):  # shapes only: nothing is allocated for a config that does not fit the file
        expected = {name: tuple(tensor.shape) for name, tensor in model_class(config)(config).state_dict().items()}
    check_weights(weights, expected, weights_file, config_file)
    model = GPT.build(config, device or autodetect_device(), compute_dtype=compute_dtype)
    model.load_state_dict(weights)
    return model.eval()


def check_weights(
    weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], weights_file: Path, config_file: Path
) -> None:
    """Refuse weights that are not what the config says (names, shapes), not floating point, or not finite:
    NaN or inf anywhere would make every reply garbage (greedy decoding of NaN logits picks token 0)."""
    found = {name: tuple(tensor.shape) for name, tensor in weights.items()}
    if expected != found:
        problems = [f"missing {name}" for name in expected.keys() - found.keys()]
        problems += [f"unexpected {name}" for name in found.keys() - expected.keys()]
        problems += [f"{name} has shape {found[name]}, {config_file.name} says {expected[name]}"
                     for name in expected.keys() & found.keys() if expected[name] != found[name]]  # fmt: skip
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise PicochatError(f"{weights_file}: weights do not match {config_file}: {'; '.join(sorted(problems)[:4])}"
                            f"{more}")  # fmt: skip
    for name, tensor in weights.items():
        if not tensor.is_floating_point():
            raise PicochatError(f"{weights_file}: tensor {name} is {tensor.dtype}, expected floating point")
        bad = tensor.numel() - int(torch.isfinite(tensor).sum())
        if bad:
            raise PicochatError(f"{weights_file}: tensor {name} has {bad:,} non-finite value(s) (NaN or inf) "
                                f"of {tensor.numel():,}")  # fmt: skip
