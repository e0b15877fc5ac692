"""The settings of the training stages, each declared once: a frozen dataclass per stage, one field per flag.

A field is declared with `setting(default, help, parse, resume=...)`; its metadata is everything the rest of
picochat needs to know about it:

    parse     the argparse type (a bad value is a usage error, exit status 2); None: a --flag / --no-flag boolean
    resume    FIXED      it defines the model or the data stream: a resume refuses another value (one line)
              KEPT       a resume reuses the run's value (its config.json "flags") unless the flag is given again
              INHERITED  like KEPT, and a new run takes it from the source stage's config.json unless given
    group, choices, nargs, metavar, positional    how the flag is shown and read

From the declaration come: the flags (`add_flags`, whose help ends with the default), the merge "command line >
saved config > source run > default" (`resolve`), the `flags` block of config.json (`as_flags`), the argv that
`picochat run` passes (`argv`), and the trainer's TrainSettings (`train_settings`). Presets (picochat/presets.py)
take the help and parser of the settings they set from here.

Adding a setting to a training stage is one field here; the stage reads it as `settings.<name>`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from picochat.common import (
    PicochatError,
    fraction,
    non_negative_float,
    non_negative_int,
    nonempty_text,
    positive_float,
    positive_int,
)

FIXED, KEPT, INHERITED = "fixed", "kept", "inherited"


def setting(
    default: Any,
    help: str,
    parse: Any = None,
    *,
    resume: str = KEPT,
    group: str | None = None,
    choices: tuple | None = None,
    nargs: str | None = None,
    metavar: str | None = None,
    positional: bool = False,
) -> Any:
    """A dataclass field declaring one flag (see the module docstring)."""
    metadata = {
        "help": help,
        "parse": parse,
        "resume": resume,
        "group": group,
        "choices": choices,
        "nargs": nargs,
        "metavar": metavar,
        "positional": positional,
    }
    if isinstance(default, list):  # a frozen dataclass still needs a fresh list per instance
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def window_pattern(text: str) -> str:
    pattern = text.strip().upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise argparse.ArgumentTypeError(f"expected letters S (short window) and L (long), e.g. SSSL, got {text!r}")
    return pattern


# ----------------------------------------------------------------------------------------------------------
# The stages


@dataclass(frozen=True)
class PretrainSettings:
    command: ClassVar[str] = "pretrain"

    paths: list = setting(
        [],
        "training text files or folders (.parquet .jsonl .txt ...); default: every parquet "
        "shard under --data-dir. Files named val* are held out for validation",
        str,
        resume=FIXED,
        nargs="*",
        positional=True,
    )
    val: list = setting(
        [],
        "validation files (then every positional file is used for training)",
        str,
        resume=FIXED,
        nargs="+",
        metavar="PATH",
    )
    text_column: str = setting("text", "parquet column / jsonl field with the text", nonempty_text, resume=FIXED)
    # run
    seed: int = setting(42, "seed for the initial weights", non_negative_int, group="run")
    fp8: bool = setting(
        False,
        "train the large Linears in FP8 (tensorwise scaling; CUDA compute capability 8.9+, "
        "emulated on the CPU; never for evaluation)",
        group="run",
    )
    embedding_dtype: str = setting(
        "auto",
        "storage of the token and value embeddings; auto: bfloat16 on CUDA with "
        "bf16 compute (as the reference; 2.6 GB less per GPU at d24), float32 elsewhere",
        str,
        group="run",
        choices=("auto", "float32", "bfloat16"),
    )
    # the depth dial
    depth: int = setting(20, "number of layers; sets everything else", positive_int, resume=FIXED, group="model")
    aspect_ratio: int = setting(64, "model width = depth x this", positive_int, resume=FIXED, group="model")
    head_dim: int = setting(128, "attention head size", positive_int, resume=FIXED, group="model")
    max_seq_len: int = setting(2048, "tokens per training row", positive_int, resume=FIXED, group="model")
    window_pattern: str = setting(
        "SSSL",
        "S/L sliding windows tiled over layers (the portable architecture: L only)",
        window_pattern,
        resume=FIXED,
        group="model",
    )
    architecture: str = setting(
        "reference",
        "reference (nanochat's, best quality per FLOP) or portable (a stock "
        "Qwen3 that llama.cpp, Ollama, MLX, vLLM and plain transformers run; see "
        "picochat/portable.py)",
        str,
        resume=FIXED,
        group="model",
        choices=("reference", "portable"),
    )
    # horizon and batch
    num_iterations: int | None = setting(None, "optimizer steps", positive_int, group="horizon")
    target_flops: float | None = setting(None, "training FLOPs budget", positive_float, group="horizon")
    target_param_data_ratio: float = setting(
        12.0, "tokens per scaling parameter; also sets the automatic batch size", positive_float, group="horizon"
    )
    total_batch_size: int | None = setting(
        None, "tokens per step, all ranks (default: from the depth)", positive_int, resume=FIXED, group="horizon"
    )
    device_batch_size: int = setting(32, "rows per forward pass per rank", positive_int, group="horizon")
    # optimization
    embedding_lr: float = setting(0.3, "AdamW, token and value embeddings", positive_float, group="optim")
    unembedding_lr: float = setting(0.008, "AdamW, lm_head", positive_float, group="optim")
    matrix_lr: float = setting(0.02, "Muon, block matrices", positive_float, group="optim")
    scalar_lr: float = setting(0.5, "AdamW, per-layer scalars", positive_float, group="optim")
    weight_decay: float = setting(0.28, "Muon weight decay before scaling", non_negative_float, group="optim")
    batch_lr_scale: float | None = setting(
        None, "override the learning-rate multiplier (default sqrt(total batch / 2^19))", positive_float, group="optim"
    )
    muon_weight_decay: float | None = setting(
        None,
        "override the derived Muon weight decay (default --weight-decay x sqrt(B/B_ref) x D_ref/D)",
        non_negative_float,
        group="optim",
    )
    warmup_steps: int = setting(40, "linear LR warmup steps", non_negative_int, group="optim")
    warmdown_ratio: float = setting(0.65, "fraction of the run with LR warmdown", fraction, group="optim")
    final_lr_frac: float = setting(0.05, "LR multiplier at the end of the warmdown", fraction, group="optim")
    # evaluation and checkpoints
    eval_every: int = setting(
        250, "validation bpb every N steps; 0: at the end only", non_negative_int, group="cadence"
    )
    eval_tokens: int = setting(80 * 524_288, "validation tokens per evaluation", positive_int, group="cadence")
    sample_every: int = setting(2000, "greedy samples every N steps; 0: never", non_negative_int, group="cadence")
    save_every: int = setting(0, "checkpoint every N steps; 0: at the end only", non_negative_int, group="cadence")
    keep_checkpoints: int = setting(2, "checkpoints kept on disk", positive_int, group="cadence")


@dataclass(frozen=True)
class SFTSettings:
    command: ClassVar[str] = "sft"

    source: str | None = setting(
        None,
        "stage to start from (default: mid if it exists, else base; base for --stage mid)",
        str,
        resume=FIXED,
        choices=("base", "mid"),
    )
    seed: int = setting(0, "mixture shuffle seed", non_negative_int, resume=FIXED)
    # data (they shape the mixture a saved loader state points into: fixed)
    mix: str | None = setting(
        None,
        "source:epochs,... e.g. alpaca:1,gsm8k:4,identity:2,my.jsonl:3 (default: "
        "tasks.DEFAULT_SFT_MIX; for --stage mid, a larger general mixture)",
        nonempty_text,
        resume=FIXED,
        group="data",
    )
    identity_name: str = setting(
        "picochat", "the model's name in the identity data", nonempty_text, resume=FIXED, group="data"
    )
    identity_creator: str | None = setting(
        None, "who made the model, in the identity data", nonempty_text, resume=FIXED, group="data"
    )
    identity_file: str | None = setting(
        None,
        "your own identity conversations (.jsonl) instead of the templates",
        nonempty_text,
        resume=FIXED,
        group="data",
    )
    val_conversations: int | None = setting(
        None,
        "conversations held out of the mixture for validation (default: 5%%, at most 500)",
        non_negative_int,
        resume=FIXED,
        group="data",
    )
    # shapes and learning rates
    max_seq_len: int | None = setting(None, "tokens per row", positive_int, resume=INHERITED, group="shape")
    device_batch_size: int | None = setting(
        None, "rows per forward pass per rank", positive_int, resume=INHERITED, group="shape"
    )
    total_batch_size: int | None = setting(
        None, "tokens per step, all ranks", positive_int, resume=INHERITED, group="shape"
    )
    embedding_lr: float | None = setting(None, "AdamW, embeddings", positive_float, resume=INHERITED, group="shape")
    unembedding_lr: float | None = setting(None, "AdamW, lm_head", positive_float, resume=INHERITED, group="shape")
    matrix_lr: float | None = setting(None, "Muon, block matrices", positive_float, resume=INHERITED, group="shape")
    scalar_lr: float | None = setting(None, "AdamW, per-layer scalars", positive_float, resume=INHERITED, group="shape")
    init_lr_frac: float = setting(0.8, "all LRs x this", positive_float, group="shape")
    warmdown_ratio: float = setting(0.5, "fraction of the run in warmdown", fraction, group="shape")
    final_lr_frac: float = setting(0.0, "LR multiplier at the end", fraction, group="shape")
    num_iterations: int | None = setting(None, "optimizer steps (default: one epoch)", positive_int, group="shape")
    # evaluation and checkpoints
    eval_every: int = setting(200, "validation every N steps", non_negative_int, group="cadence")
    eval_tokens: int = setting(40 * 524_288, "validation tokens", positive_int, group="cadence")
    sample_every: int = setting(
        0, "greedy chat replies to a few prompts every N steps; 0: at the end only", non_negative_int, group="cadence"
    )
    chat_eval_tasks: str | None = setting(
        None,
        "also run these chat evaluations (e.g. ARC-Easy,GSM8K; see "
        "`picochat eval chat`) whenever samples are taken; results in "
        "<stage>/chat_eval/",
        nonempty_text,
        group="cadence",
    )
    chat_eval_max_problems: int = setting(24, "problems per task for --chat-eval-tasks", positive_int, group="cadence")
    save_every: int = setting(0, "checkpoint every N steps (0: at the end)", non_negative_int, group="cadence")
    keep_checkpoints: int = setting(2, "checkpoints kept on disk", positive_int, group="cadence")


@dataclass(frozen=True)
class RLSettings:
    command: ClassVar[str] = "rl"

    source: str = setting("sft", "stage to start from", str, resume=FIXED, choices=("sft", "mid", "base"))
    num_epochs: int = setting(1, "passes over GSM8K train", positive_int)
    num_steps: int | None = setting(None, "RL steps (default: train questions / examples per step)", positive_int)
    examples_per_step: int = setting(16, "questions per step, all ranks", positive_int, resume=FIXED)
    num_samples: int = setting(16, "samples per question", positive_int, resume=FIXED)
    device_batch_size: int = setting(8, "samples per forward pass", positive_int)
    max_new_tokens: int = setting(256, "tokens per sample", positive_int)
    temperature: float = setting(1.0, "sampling temperature", non_negative_float)
    top_k: int = setting(50, "top-k sampling, 0 = off", non_negative_int)
    embedding_lr: float = setting(0.2, "AdamW, embeddings", positive_float)
    unembedding_lr: float = setting(0.004, "AdamW, lm_head", positive_float)
    matrix_lr: float = setting(0.02, "Muon, block matrices", positive_float)
    scalar_lr: float = setting(0.5, "AdamW, per-layer scalars", positive_float)
    weight_decay: float = setting(0.0, "Muon weight decay", non_negative_float)
    init_lr_frac: float = setting(0.05, "all LRs x this", positive_float)
    eval_every: int = setting(60, "pass@k every N steps; 0: at the end", non_negative_int)
    eval_examples: int = setting(400, "test questions for pass@k", positive_int)
    eval_samples: int = setting(8, "samples per test question: k = 1..N", positive_int)
    save_every: int = setting(60, "checkpoint every N steps; 0: at the end", non_negative_int)
    keep_checkpoints: int = setting(2, "checkpoints kept on disk", positive_int)


# ----------------------------------------------------------------------------------------------------------
# What comes from a declaration


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def defaults(settings_class: type) -> dict[str, Any]:
    """{name: default} of a stage's settings."""
    return dataclasses.asdict(settings_class())


def add_flags(parser: argparse.ArgumentParser, settings_class: type, groups: dict[str, Any] | None = None) -> None:
    """One flag per field, in declaration order, into `groups[field's group]` (else the parser). Every flag's
    default is None, so that resolve() can tell a flag given on the command line from one left out."""
    for item in fields(settings_class):
        meta = item.metadata
        target = (groups or {}).get(meta["group"], parser)
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        shown = "" if default is None or default is False or default == [] else f" (default: {default})"
        options: dict[str, Any] = {"default": None, "help": meta["help"] + shown}
        if meta["parse"] is None:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = meta["parse"]
        for key in ("choices", "nargs", "metavar"):
            if meta[key] is not None:
                options[key] = meta[key]
        if meta["positional"]:
            options.pop("metavar", None)
            target.add_argument(item.name, **options)
        else:
            target.add_argument(flag_name(item.name), dest=item.name, **options)


def resolve(settings_class: type, args: argparse.Namespace, saved: dict[str, Any] | None) -> Any:
    """The settings of this invocation: command line > saved (the run's config.json "flags", on --resume) >
    default. A FIXED setting given with another value than the saved one is refused. INHERITED settings that
    are still None are the source run's to fill in (the stage does, with its source's config)."""
    values = {}
    for item in fields(settings_class):
        name = item.name
        given = getattr(args, name, None)
        if given == []:  # no positional paths
            given = None
        if saved is not None and name in saved:
            if given is not None and item.metadata["resume"] == FIXED and given != saved[name]:
                flag = "the data paths" if item.metadata["positional"] else flag_name(name)
                raise PicochatError(
                    f"--resume: {flag} was {saved[name]!r} for this run, not {given!r} ({name} in "
                    "its config.json); resume with the same value, or start a new run"
                )
            values[name] = saved[name] if given is None else given
        elif given is not None:
            values[name] = given
    return settings_class(**values)


def inherited_names(settings_class: type) -> tuple[str, ...]:
    return tuple(item.name for item in fields(settings_class) if item.metadata["resume"] == INHERITED)


def fixed_names(settings_class: type) -> tuple[str, ...]:
    return tuple(item.name for item in fields(settings_class) if item.metadata["resume"] == FIXED)


def as_flags(settings: Any) -> dict[str, Any]:
    """The `flags` block of a stage's config.json: every setting's value."""
    return dataclasses.asdict(settings)


def argv(settings: Any, names: list[str]) -> list[str]:
    """The command-line flags that give `names` their values in `settings` (None: left out, the stage derives it)."""
    meta = {item.name: item.metadata for item in fields(settings)}
    result: list[str] = []
    for name in names:
        value = getattr(settings, name)
        if value is None:
            continue
        if meta[name]["parse"] is None:
            result.append(flag_name(name) if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, list):
            result += value if meta[name]["positional"] else [flag_name(name), *map(str, value)]
        else:
            result += [flag_name(name), str(value)]
    return result


def train_settings(own: dict[str, Any], **derived: Any) -> Any:
    """The trainer's TrainSettings: `derived` values first, then the stage's settings (`as_flags`) of those names."""
    from picochat.trainer import TrainSettings

    values = {
        item.name: derived.get(item.name, own.get(item.name))
        for item in fields(TrainSettings)
        if item.name in derived or item.name in own
    }
    return TrainSettings(**values)
