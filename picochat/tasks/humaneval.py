"""HumanEval: 164 Python functions to complete from a signature and docstring, checked by unit tests.

File: <data_dir>/chat_eval/humaneval/HumanEval.jsonl.gz, rows {"task_id", "prompt", "canonical_solution", "test",
"entry_point"}. The user message is the prompt (imports, signature, docstring); the ideal assistant message is the
prompt followed by the canonical body, i.e. the whole function.

Scoring runs a program in the sandbox (picochat.sandbox.run_python: its own process, rlimits, 5 s, 256 MB):

    the prompt's import lines
    the completion's code: the first ```python block of the response, else the whole response
    the test code (defines check(candidate))
    check(<entry_point>)

and the answer is correct when that program exits cleanly. A model that writes only the function body (without
`def <entry_point>(`) gets the prompt put in front of its code, so both ways of answering can pass.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from picochat.common import PicochatError, read_jsonl
from picochat.tasks.common import GENERATIVE, Task, data_file, require_string

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
CODE_BLOCK = re.compile(r"```(?:python3?|py)?[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL)
TIMEOUT_SECONDS = 5.0
MAX_MEMORY_BYTES = 256 * 1024 * 1024


def _run_in_sandbox(code: str) -> bool:
    from picochat.tools import run_python

    return run_python(code, timeout=TIMEOUT_SECONDS, max_memory_bytes=MAX_MEMORY_BYTES).success


class HumanEval(Task):
    name = "HumanEval"
    eval_type = GENERATIVE
    baseline = 0.0

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        *,
        execute: Callable[[str], bool] | None = None,
    ) -> None:
        """execute(program) -> passed; default: run it in picochat.sandbox (5 s, 256 MB)."""
        self.execute = execute or _run_in_sandbox
        path = data_file(data_dir, "chat_eval/humaneval/HumanEval.jsonl.gz", "the HumanEval problems")
        self.rows: list[dict[str, str]] = []
        for line, row in read_jsonl(path):
            where = f"{path}:{line}"
            if not isinstance(row, dict):
                raise PicochatError(f"{where}: expected a JSON object, got {type(row).__name__}")
            self.rows.append({field: require_string(row.get(field), where, field) for field in FIELDS})
        if not self.rows:
            raise PicochatError(f"{path}: no problems in the file")

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
            ],
            "task_id": row["task_id"],
            "prompt": row["prompt"],
            "test": row["test"],
            "entry_point": row["entry_point"],
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        return self.execute(check_program(conversation, response))


def extract_code(response: str) -> str:
    """The first fenced python code block of a response (an unclosed one runs to the end), else the response."""
    match = CODE_BLOCK.search(response)
    return match.group(1) if match else response


def check_program(conversation: dict, response: str) -> str:
    """The program that passes iff the response's code is a correct solution (see the module docstring)."""
    prompt, entry_point = conversation["prompt"], conversation["entry_point"]
    code = extract_code(response)
    if not re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        code = prompt + code  # only the body was written: complete the prompt with it
    imports = [line for line in prompt.splitlines() if line.startswith(("import ", "from "))]
    return "\n".join([*imports, "", code, "", conversation["test"], "", f"check({entry_point})", ""])
