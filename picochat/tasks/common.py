"""What every chat task shares: the Task interface, views over tasks, multiple-choice prompts, reading task files.

A *task* is a list of conversations in the shape the tokenizer renders (picochat/tokenizer.py):

    {"messages": [{"role": "user", "content": str},
                  {"role": "assistant", "content": str | [{"type": "text"|"python"|"python_output", "text": str}]},
                  ...],
     ...task-specific fields (the answer, the allowed letters, the test code)...}

Training reads a task's conversations whole (the final assistant message is the target). Evaluation renders the
conversation without its final assistant message, lets the model answer, and asks the task whether that answer
is right. There are two ways to evaluate (REFERENCE A.18):
  - categorical (ARC, MMLU): the answer is one letter; the evaluator compares the model's probabilities of the
    allowed letters only (`allowed_letters`), so even a small model that would ramble gets a fair score;
  - generative (GSM8K, HumanEval, spelling): the model writes freely and `evaluate` checks the text.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from picochat.common import PicochatError, read_text, resolve_data_dir

CATEGORICAL = "categorical"
GENERATIVE = "generative"
LETTERS = "ABCDEFGHIJ"  # answer letters of multiple-choice questions, by position of the choice


class Task:
    """A sized, indexable collection of conversations with a way to score an answer.

    Subclasses set `name`, `eval_type` and `baseline`, and implement `__len__`, `example(index)` and `evaluate`.
    `task[i]` builds a fresh conversation dict on every call, so callers may modify what they get.
    """

    name: str = "task"
    eval_type: str = GENERATIVE  # CATEGORICAL or GENERATIVE
    baseline: float = 0.0  # the score of random guessing (0.25 for 4-way multiple choice), for centered scores

    def __len__(self) -> int:
        raise NotImplementedError

    def example(self, index: int) -> dict:
        """The conversation at `index`, 0 <= index < len(self)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"{self.name}: index must be an int, got {type(index).__name__}")
        size = len(self)
        if index < 0:
            index += size
        if not 0 <= index < size:
            raise IndexError(f"{self.name}: index out of range (the task has {size} conversations)")
        return self.example(index)

    def __iter__(self) -> Iterator[dict]:
        for index in range(len(self)):
            yield self.example(index)

    def evaluate(self, conversation: dict, response: str) -> bool:
        """Is `response` (the model's final assistant message, as text) a correct answer to `conversation`?"""
        raise NotImplementedError(f"{self.name}: this task has no automatic evaluation (it is training data)")

    def reward(self, conversation: dict, response: str) -> float:
        """The RL reward of a response: 1.0 if correct, else 0.0 (tasks with partial credit override this)."""
        return float(self.evaluate(conversation, response))

    def allowed_letters(self, conversation: dict) -> list[str]:
        """The answer letters a categorical evaluator chooses among for this conversation."""
        if self.eval_type != CATEGORICAL:
            raise ValueError(f"{self.name}: allowed_letters is only defined for categorical tasks")
        return list(conversation["letters"])

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {len(self)} conversations>"


class TaskView(Task):
    """Some of a task's conversations, in a given order (a slice, a shuffle, a subset). Evaluation delegates to
    the underlying task, so a view of GSM8K scores answers exactly like GSM8K."""

    def __init__(self, task: Task, indices: Sequence[int], name: str | None = None) -> None:
        size = len(task)
        for index in indices:
            if not 0 <= index < size:
                raise IndexError(f"{task.name}: index {index} out of range (the task has {size} conversations)")
        self.task = task
        self.indices = list(indices)
        self.name = name or task.name
        self.eval_type = task.eval_type
        self.baseline = task.baseline

    def __len__(self) -> int:
        return len(self.indices)

    def example(self, index: int) -> dict:
        return self.task.example(self.indices[index])

    def evaluate(self, conversation: dict, response: str) -> bool:
        return self.task.evaluate(conversation, response)

    def reward(self, conversation: dict, response: str) -> float:
        return self.task.reward(conversation, response)

    def allowed_letters(self, conversation: dict) -> list[str]:
        return self.task.allowed_letters(conversation)


def take(task: Task, start: int = 0, stop: int | None = None, step: int = 1) -> TaskView:
    """task[start:stop:step] as a task (e.g. the first 400 problems of a test set)."""
    return TaskView(task, range(len(task))[start:stop:step])


def shuffled(task: Task, seed: int) -> TaskView:
    """The task in a random order fixed by `seed` (the same on every machine), so that the first N conversations
    are a fair sample (MMLU's files are sorted by subject)."""
    order = list(range(len(task)))
    random.Random(seed).shuffle(order)
    return TaskView(task, order)


# ----------------------------------------------------------------------------------------------------------
# Multiple choice prompts (REFERENCE A.15): the letter comes *after* its choice and there is no space after "=",
# so the letter in the prompt is tokenized like the bare letter the model answers with (with a space before it,
# " A" would be a different token from "A").


def render_multiple_choice(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def evaluate_letter(conversation: dict, response: str) -> bool:
    """Categorical scoring: the response is the chosen letter (surrounding whitespace ignored)."""
    return response.strip() == conversation["answer"]


# ----------------------------------------------------------------------------------------------------------
# Task files. Built-in tasks read the shared data layout (<data_dir>/chat_eval/gsm8k/test.jsonl, ...). Every
# problem in a file is a PicochatError naming the file and line.


def data_file(data_dir: str | os.PathLike | None, relative: str, what: str) -> Path:
    """<data_dir>/<relative>, which must exist; data_dir None means common.resolve_data_dir()."""
    root = resolve_data_dir(data_dir)
    path = root / relative
    if not path.is_file():
        raise PicochatError(
            f"{path}: not found ({what}); expected the shared data layout under {root} "
            "(set --data-dir or $PICOCHAT_DATA_DIR)"
        )
    return path


def read_json_list(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number where the element starts, element) for each element of a file holding one JSON list.

    The list is parsed element by element (json.JSONDecoder.raw_decode) so that an error in a record can name
    the line where that record starts, as for JSONL files.
    """
    text = read_text(path)
    decoder = json.JSONDecoder()
    position, line, counted_to = 0, 1, 0

    def skip_space(at: int) -> int:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        return at

    def line_of(at: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, at)
        counted_to = at
        return line

    def fail(at: int, problem: str) -> PicochatError:
        return PicochatError(f"{path}:{line_of(at)}: {problem}")

    position = skip_space(position)
    if position == len(text) or text[position] != "[":
        raise fail(position, "expected a JSON list ([...]) of records (for one record per line, use .jsonl)")
    position = skip_space(position + 1)
    if position < len(text) and text[position] == "]":
        position += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, position)
            except json.JSONDecodeError as error:
                raise PicochatError(
                    f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})"
                ) from None
            yield line_of(position), value
            position = skip_space(end)
            if position < len(text) and text[position] == ",":
                position = skip_space(position + 1)
                continue
            if position < len(text) and text[position] == "]":
                position += 1
                break
            raise fail(position, "not valid JSON (expected ',' or ']' after a list element)")
    if skip_space(position) != len(text):
        raise fail(skip_space(position), "not valid JSON (extra data after the list)")


def read_csv(path: Path, header: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) for every row of a CSV file whose first line must be exactly `header`."""
    text = read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        first = next(reader, None)
        if first != list(header):
            raise PicochatError(f"{path}:1: expected the header {','.join(header)}, got {','.join(first or [])!r}")
        previous_end = reader.line_num
        for row in reader:
            line_number, previous_end = previous_end + 1, reader.line_num  # a quoted field may span lines
            if not row:
                continue
            if len(row) != len(header):
                raise PicochatError(f"{path}:{line_number}: expected {len(header)} fields, got {len(row)}")
            yield line_number, row
    except csv.Error as error:
        raise PicochatError(f"{path}:{reader.line_num}: not valid CSV ({error})") from None


def require_string(value: Any, where: str, field: str) -> str:
    """A field that must be a non-empty string, else a PicochatError naming `where` and the field."""
    if not isinstance(value, str):
        raise PicochatError(f'{where}: field "{field}" must be a string, got {type(value).__name__}')
    if not value.strip():
        raise PicochatError(f'{where}: field "{field}" is empty')
    return value
