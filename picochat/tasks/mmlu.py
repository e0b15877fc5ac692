"""MMLU: 4-way multiple-choice questions over 57 subjects (dev = 5 per subject for few-shot, test = 14,042).

Files: <data_dir>/chat_eval/mmlu/{dev,test}/<subject>_{dev,test}.csv. The copy we have differs from the original
release: each file has a header line `question,choice0,choice1,choice2,choice3,answer`, and `answer` is a 0-based
index (0 = A ... 3 = D), not a letter.

Few-shot: with few_shot=k, the first k dev questions of the same subject come first, each as a user turn and the
correct letter as the assistant's reply, so the model sees the answer format before the real question.
"""

from __future__ import annotations

import os

from picochat.common import PicochatError, resolve_data_dir
from picochat.tasks.common import (
    CATEGORICAL,
    Task,
    evaluate_letter,
    read_csv,
    render_multiple_choice,
    require_string,
)

SPLITS = ("dev", "test")
HEADER = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
LETTERS = ["A", "B", "C", "D"]


class MMLU(Task):
    name = "MMLU"
    eval_type = CATEGORICAL
    baseline = 0.25

    def __init__(
        self,
        split: str = "test",
        *,
        subjects: list[str] | None = None,
        few_shot: int = 0,
        data_dir: str | os.PathLike | None = None,
    ) -> None:
        if split not in SPLITS:
            raise PicochatError(f"MMLU split {split!r}: expected one of {', '.join(SPLITS)}")
        if not isinstance(few_shot, int) or not 0 <= few_shot <= 5:
            raise PicochatError(f"MMLU few_shot must be an integer from 0 to 5 (dev has 5 per subject), got {few_shot}")
        self.split = split
        self.few_shot = few_shot
        root = resolve_data_dir(data_dir) / "chat_eval" / "mmlu"
        self.rows = _load_split(root, split, subjects)  # (subject, question, choices, answer index)
        self.examples_by_subject: dict[str, list[tuple[str, str, list[str], int]]] = {}
        if few_shot:
            for row in self.rows if split == "dev" else _load_split(root, "dev", subjects):
                self.examples_by_subject.setdefault(row[0], []).append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> dict:
        subject, question, choices, answer = self.rows[index]
        messages = []
        # Few-shot examples from dev, never the question itself (when evaluating on dev).
        shots = [row for row in self.examples_by_subject.get(subject, []) if row[1] != question][: self.few_shot]
        for _, shot_question, shot_choices, shot_answer in shots:
            messages.append({"role": "user", "content": render_multiple_choice(shot_question, LETTERS, shot_choices)})
            messages.append({"role": "assistant", "content": LETTERS[shot_answer]})
        messages.append({"role": "user", "content": render_multiple_choice(question, LETTERS, choices)})
        messages.append({"role": "assistant", "content": LETTERS[answer]})
        return {"messages": messages, "letters": list(LETTERS), "answer": LETTERS[answer], "subject": subject}

    def evaluate(self, conversation: dict, response: str) -> bool:
        return evaluate_letter(conversation, response)


def _load_split(root, split: str, subjects: list[str] | None) -> list[tuple[str, str, list[str], int]]:
    folder = root / split
    suffix = f"_{split}.csv"
    files = sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []
    if not files:
        raise PicochatError(f"{folder}: no *{suffix} files (the MMLU {split} split; expected the shared data layout)")
    available = {path.name[: -len(suffix)]: path for path in files}
    if subjects is not None:
        unknown = [subject for subject in subjects if subject not in available]
        if unknown:
            raise PicochatError(f"MMLU: unknown subject(s) {', '.join(unknown)}; known: {', '.join(available)}")
        available = {subject: available[subject] for subject in subjects}
    rows = []
    for subject, path in available.items():
        for line, fields in read_csv(path, HEADER):
            where = f"{path}:{line}"
            question = require_string(fields[0], where, "question")
            choices = [require_string(text, where, f"choice{number}") for number, text in enumerate(fields[1:5])]
            if fields[5] not in ("0", "1", "2", "3"):
                raise PicochatError(f'{where}: field "answer" must be 0, 1, 2 or 3 (0 = A), got {fields[5]!r}')
            rows.append((subject, question, choices, int(fields[5])))
    return rows
