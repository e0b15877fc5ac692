"""Training mixtures: several tasks, each repeated for some number of epochs, in one seeded random order.

SFT learns from a blend of sources (REFERENCE A.16: general chat + MMLU x3 + GSM8K x4). A mixture lists every
conversation of every task `epochs` times, then shuffles the whole list with a seeded generator, so

  - the blend is even throughout training (no long stretch of one task), and the order is the same on every
    machine and every rank (each rank then takes its own stride of the one order);
  - epochs are exact: with epochs=3 every conversation of the task appears exactly 3 times; a fractional part
    adds a seeded random subset (epochs=0.5: half the conversations once, each at most once).

`build_mixture` reads the spec the SFT stage takes as --mix, e.g. "alpaca:1,gsm8k:4,identity:2,path/to/my.jsonl:3":
comma-separated entries `source:epochs` (":epochs" may be left out, meaning 1), where a source is a built-in name
(BUILTIN_SOURCES) or the path of the user's own conversation file (.jsonl, .jsonl.gz or .json: see
conversations.py). A path may not contain a comma.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from picochat.common import PicochatError
from picochat.tasks.common import Task, data_file
from picochat.tasks.conversations import SUFFIXES, Conversations

# name -> what it is. Sizes are for the shared data folder (after its documented skips).
BUILTIN_SOURCES = {
    "alpaca": "sft/alpaca_en_demo.json: 999 instruction-following examples (Alpaca format, GPT-4 answers)",
    "code_alpaca": "sft/code_alpaca_2k.json: 2,015 coding instructions",
    "gpteacher_roleplay": "sft/gpteacher_roleplay.json: 3,146 role-play prompts",
    "gpteacher_toolformer": "sft/gpteacher_toolformer.json: 7,673 answers with text tool calls like wikipedia('...')",
    "glaive_toolcall": "sft/glaive_toolcall_en_demo.json: 194 chats (ShareGPT, cut before function calls)",
    "identity": "1,000 generated conversations about the model itself (its --name and --creator)",
    "gsm8k": "chat_eval/gsm8k/train.jsonl: 7,473 math word problems solved with calculator calls",
    "arc_easy": "chat_eval/arc/ARC-Easy-train.jsonl: 2,251 science multiple-choice questions",
    "arc_challenge": "chat_eval/arc/ARC-Challenge-train.jsonl: 1,119 harder science multiple-choice questions",
    "arc": "arc_easy and arc_challenge together",
    "spelling": "2,000 generated spelling and letter-counting conversations (with the python tool)",
}
_SFT_FILES = {
    "alpaca": "sft/alpaca_en_demo.json",
    "code_alpaca": "sft/code_alpaca_2k.json",
    "gpteacher_roleplay": "sft/gpteacher_roleplay.json",
    "gpteacher_toolformer": "sft/gpteacher_toolformer.json",
    "glaive_toolcall": "sft/glaive_toolcall_en_demo.json",
}
# A suggested --mix for the shared data: general chat, the model's identity twice (it is small), math and
# multiple choice in the answer formats the evaluations use, and spelling. gpteacher_toolformer is left out: its
# answers write tool calls as plain text, which would teach the model to call tools that do not exist.
DEFAULT_SFT_MIX = "alpaca:2,code_alpaca:1,gpteacher_roleplay:1,glaive_toolcall:1,identity:2,gsm8k:2,arc:1,spelling:1"


class TaskMixture(Task):
    """The conversations of several tasks, each `epochs` times, in one order shuffled with `seed`."""

    name = "mixture"

    def __init__(self, entries: Sequence[tuple[Task, float]], seed: int = 0) -> None:
        import numpy as np

        if not entries:
            raise PicochatError("a mixture needs at least one task")
        self.tasks = [task for task, _ in entries]
        self.epochs = [check_epochs(epochs, task.name) for task, epochs in entries]
        self.seed = seed
        task_ids, example_ids = [], []
        for position, (task, epochs) in enumerate(zip(self.tasks, self.epochs)):
            size = len(task)
            whole, fraction = int(epochs), epochs - int(epochs)
            picked = [np.tile(np.arange(size, dtype=np.int64), whole)]
            if fraction > 0:
                # A subset that depends only on (seed, position in the mixture): each conversation at most once.
                subset = np.random.default_rng([seed, position]).permutation(size)[: round(fraction * size)]
                picked.append(subset.astype(np.int64))
            examples = np.concatenate(picked)
            example_ids.append(examples)
            task_ids.append(np.full(len(examples), position, dtype=np.int32))
        order = np.random.default_rng(seed).permutation(sum(len(ids) for ids in example_ids))
        self.task_ids = np.concatenate(task_ids)[order]
        self.example_ids = np.concatenate(example_ids)[order]
        if len(self.task_ids) == 0:
            raise PicochatError("the mixture is empty (every task has 0 conversations after applying the epochs)")

    def __len__(self) -> int:
        return len(self.task_ids)

    def example(self, index: int) -> dict:
        return self.tasks[self.task_ids[index]].example(int(self.example_ids[index]))

    def source(self, index: int) -> Task:
        """The task conversation `index` comes from."""
        return self.tasks[self.task_ids[index]]

    def summary(self) -> list[dict]:
        """One row per task: name, its conversations, epochs, conversations in the mixture (for logs, reports)."""
        import numpy as np

        counts = np.bincount(self.task_ids, minlength=len(self.tasks))
        return [
            {"task": task.name, "conversations": len(task), "epochs": epochs, "in_mixture": int(count)}
            for task, epochs, count in zip(self.tasks, self.epochs, counts)
        ]


def check_epochs(epochs: float, name: str) -> float:
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not math.isfinite(epochs) or epochs <= 0:
        raise PicochatError(f"mixture entry {name!r}: epochs must be a positive number, got {epochs!r}")
    return float(epochs)


def parse_mixture_spec(spec: str) -> list[tuple[str, float]]:
    """ "alpaca:1,gsm8k:4,my.jsonl" -> [("alpaca", 1.0), ("gsm8k", 4.0), ("my.jsonl", 1.0)] (syntax only)."""
    if not isinstance(spec, str) or not spec.strip():
        raise PicochatError("empty mixture spec; expected entries like alpaca:1,gsm8k:4,path/to/my.jsonl:2")
    entries = []
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            raise PicochatError(f"mixture spec {spec!r}: empty entry (two commas in a row, or a trailing comma)")
        source, colon, tail = entry.rpartition(":")
        if not colon:
            entries.append((entry, 1.0))
            continue
        try:
            epochs = float(tail)
        except ValueError:
            if source.strip() in BUILTIN_SOURCES or source.strip().endswith(SUFFIXES):
                raise PicochatError(
                    f"mixture entry {entry!r}: epochs must be a positive number, got {tail!r}"
                ) from None
            entries.append((entry, 1.0))  # a colon that is part of a file name
            continue
        if not source.strip():
            raise PicochatError(f"mixture entry {entry!r}: no source before ':'")
        entries.append((source.strip(), check_epochs(epochs, source.strip())))
    return entries


def builtin_tasks(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    identity_name: str = "picochat",
    identity_creator: str | None = None,
    identity_file: str | os.PathLike | None = None,
) -> list[Task]:
    """The task(s) a built-in source name stands for (a list: "arc" is two tasks)."""
    from picochat.tasks.arc import ARC
    from picochat.tasks.gsm8k import GSM8K
    from picochat.tasks.identity import Identity
    from picochat.tasks.spelling import Spelling

    if name in _SFT_FILES:
        # These files are known to hold a few records we cannot use (e.g. 2 empty outputs in code_alpaca):
        # they are left out with a warning instead of failing the run.
        path = data_file(data_dir, _SFT_FILES[name], f"the {name} SFT set")
        return [Conversations(path, skip_invalid=True, name=name)]
    if name == "identity":
        return [Identity(identity_name, identity_creator, seed=seed, path=identity_file)]
    if name == "gsm8k":
        return [GSM8K("train", data_dir=data_dir)]
    if name in ("arc_easy", "arc_challenge"):
        return [ARC(name.removeprefix("arc_"), "train", data_dir=data_dir)]
    if name == "arc":
        return [ARC("easy", "train", data_dir=data_dir), ARC("challenge", "train", data_dir=data_dir)]
    if name == "spelling":
        return [Spelling("mixed", "train", seed=seed, data_dir=data_dir)]
    raise PicochatError(f"unknown built-in source {name!r}; known: {', '.join(BUILTIN_SOURCES)}")


def build_mixture(
    spec: str,
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    identity_name: str = "picochat",
    identity_creator: str | None = None,
    identity_file: str | os.PathLike | None = None,
    skip_invalid: bool = False,
) -> TaskMixture:
    """The mixture a --mix spec describes. skip_invalid applies to the user's own files (built-in files always
    leave out their known-bad records with a warning)."""
    entries: list[tuple[Task, float]] = []
    for source, epochs in parse_mixture_spec(spec):
        if source in BUILTIN_SOURCES:
            tasks = builtin_tasks(
                source,
                data_dir=data_dir,
                seed=seed,
                identity_name=identity_name,
                identity_creator=identity_creator,
                identity_file=identity_file,
            )
        elif source.endswith(SUFFIXES) or "/" in source or os.sep in source:
            tasks = [Conversations(source, skip_invalid=skip_invalid)]
        else:
            raise PicochatError(
                f"mixture source {source!r}: not a built-in source ({', '.join(BUILTIN_SOURCES)}) "
                f"nor a conversation file ({', '.join(SUFFIXES)})"
            )
        entries += [(task, epochs) for task in tasks]
    return TaskMixture(entries, seed=seed)
