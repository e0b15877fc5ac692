"""ARC (AI2 Reasoning Challenge): grade-school science questions with 3-5 choices, Easy and Challenge sets.

Files: <data_dir>/chat_eval/arc/ARC-{Easy,Challenge}-{train,validation,test}.jsonl, one question per line:
{"id", "question", "choices": {"text": [...], "label": [...]}, "answerKey"}.

Most questions label their choices A-D, but some use 1-4 and a few have 3 or 5 choices. We always show letters
A, B, C, ... by position of the choice, so the model answers every question with the same kind of token
(answerKey "3" with labels 1-4 becomes "C"). The conversation keeps the letters that exist for that question
(`letters`), which a categorical evaluator must restrict itself to.
"""

from __future__ import annotations

import os

from picochat.common import PicochatError, read_jsonl
from picochat.tasks.common import (
    CATEGORICAL,
    LETTERS,
    Task,
    data_file,
    evaluate_letter,
    render_multiple_choice,
    require_string,
)

SUBSETS = {"easy": "ARC-Easy", "challenge": "ARC-Challenge"}
SPLITS = ("train", "validation", "test")


class ARC(Task):
    eval_type = CATEGORICAL
    baseline = 0.25  # ChatCORE centers ARC on 4-way guessing, as the reference does (A.18)

    def __init__(self, subset: str = "easy", split: str = "test", data_dir: str | os.PathLike | None = None) -> None:
        if subset not in SUBSETS:
            raise PicochatError(f"ARC subset {subset!r}: expected one of {', '.join(SUBSETS)}")
        if split not in SPLITS:
            raise PicochatError(f"ARC split {split!r}: expected one of {', '.join(SPLITS)}")
        self.name = SUBSETS[subset]
        self.split = split
        path = data_file(data_dir, f"chat_eval/arc/{SUBSETS[subset]}-{split}.jsonl", f"the {self.name} {split} set")
        # (question, choices, index of the correct choice) per row, validated once here.
        self.rows: list[tuple[str, list[str], int]] = [
            _parse_row(row, f"{path}:{line}") for line, row in read_jsonl(path)
        ]
        if not self.rows:
            raise PicochatError(f"{path}: no questions in the file")

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> dict:
        question, choices, correct = self.rows[index]
        letters = list(LETTERS[: len(choices)])
        return {
            "messages": [
                {"role": "user", "content": render_multiple_choice(question, letters, choices)},
                {"role": "assistant", "content": letters[correct]},
            ],
            "letters": letters,
            "answer": letters[correct],
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        return evaluate_letter(conversation, response)


def _parse_row(row: object, where: str) -> tuple[str, list[str], int]:
    if not isinstance(row, dict):
        raise PicochatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    question = require_string(row.get("question"), where, "question")
    choices = row.get("choices")
    if (
        not isinstance(choices, dict)
        or not isinstance(choices.get("text"), list)
        or not isinstance(choices.get("label"), list)
    ):
        raise PicochatError(f'{where}: field "choices" must be an object {{"text": [...], "label": [...]}}')
    texts, labels = choices["text"], choices["label"]
    if len(texts) != len(labels) or not 2 <= len(texts) <= len(LETTERS):
        raise PicochatError(
            f"{where}: expected 2-{len(LETTERS)} choices with one label each, got {len(texts)} texts and "
            f"{len(labels)} labels"
        )
    for number, text in enumerate(texts):
        require_string(text, where, f"choices.text[{number}]")
    answer = row.get("answerKey")
    if answer not in labels:
        raise PicochatError(f'{where}: "answerKey" {answer!r} is not one of the labels {labels}')
    return question, list(texts), labels.index(answer)
