"""GSM8K: grade-school math word problems with worked solutions (train 7,473, test 1,319).

Files: <data_dir>/chat_eval/gsm8k/{train,test}.jsonl, lines {"question", "answer"}. The answer is a worked
solution whose arithmetic is annotated for a calculator, and whose last line is "#### <final number>":

    Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.
    ...
    #### 18

Each annotation <<expression=result>> becomes a tool call in the assistant message, so the model learns to use
the calculator (REFERENCE A.15): a `python` part with the expression (trained on: the model writes it) and a
`python_output` part with the result (not trained on: at inference the engine runs the tool and forces its output
into the sequence). The text around the annotations is kept unchanged.

Scoring: the number after "####" in the response must equal the reference's, compared as strings after removing
thousands commas (and a sentence-ending period). The RL reward is 1.0 for a correct answer, else 0.0.
"""

from __future__ import annotations

import os
import re

from picochat.common import PicochatError, read_jsonl
from picochat.tasks.common import GENERATIVE, Task, data_file, require_string

SPLITS = ("train", "test")
ANNOTATION = re.compile(r"<<([^<>]*)>>")
FINAL_ANSWER = re.compile(r"#### (-?[0-9.,]+)")


class GSM8K(Task):
    name = "GSM8K"
    eval_type = GENERATIVE
    baseline = 0.0

    def __init__(self, split: str = "test", data_dir: str | os.PathLike | None = None) -> None:
        if split not in SPLITS:
            raise PicochatError(f"GSM8K split {split!r}: expected one of {', '.join(SPLITS)}")
        self.split = split
        path = data_file(data_dir, f"chat_eval/gsm8k/{split}.jsonl", f"the GSM8K {split} split")
        self.rows: list[tuple[str, list[dict], str]] = []  # (question, assistant parts, final answer)
        for line, row in read_jsonl(path):
            where = f"{path}:{line}"
            if not isinstance(row, dict):
                raise PicochatError(f"{where}: expected a JSON object, got {type(row).__name__}")
            question = require_string(row.get("question"), where, "question")
            solution = require_string(row.get("answer"), where, "answer")
            answer = extract_answer(solution)
            if answer is None:
                raise PicochatError(f'{where}: field "answer" does not end with "#### <number>"')
            self.rows.append((question, solution_parts(solution, where), answer))
        if not self.rows:
            raise PicochatError(f"{path}: no problems in the file")

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> dict:
        question, parts, answer = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": [dict(part) for part in parts]},
            ],
            "answer": answer,
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        predicted = extract_answer(response)
        return predicted is not None and predicted == conversation["answer"]


def extract_answer(text: str) -> str | None:
    """The number after the first "#### ", normalized (commas and a trailing period removed); None if absent."""
    match = FINAL_ANSWER.search(text)
    if match is None:
        return None
    number = match.group(1).replace(",", "").rstrip(".")
    return number or None


def solution_parts(solution: str, where: str = "solution") -> list[dict]:
    """A worked solution as assistant parts: text, then per <<expression=result>> a python part and a
    python_output part, then text again. Joining the parts back with <<expression=result>> gives the solution."""
    parts: list[dict] = []
    position = 0
    for match in ANNOTATION.finditer(solution):
        if match.start() > position:
            parts.append({"type": "text", "text": solution[position : match.start()]})
        expression, equals, result = match.group(1).rpartition("=")
        if not equals or not expression.strip():
            raise PicochatError(f"{where}: calculator annotation <<{match.group(1)}>> is not <<expression=result>>")
        parts.append({"type": "python", "text": expression})
        parts.append({"type": "python_output", "text": result})
        position = match.end()
    if position < len(solution):
        parts.append({"type": "text", "text": solution[position:]})
    return parts
