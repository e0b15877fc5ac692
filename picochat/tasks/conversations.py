"""The user's own conversations: OpenAI messages, ShareGPT and Alpaca files, checked and turned into our shape.

Files: .jsonl / .jsonl.gz (one record per line) or .json (one list of records). Each record may be, in any mix:

  - OpenAI chat:  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}, or the list of
                  messages itself (e.g. shared/data/identity/identity_conversations.jsonl);
  - ShareGPT:     {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...], "system"?: str};
  - Alpaca:       {"instruction": str, "input"?: str, "output": str, "system"?: str, "history"?: [[q, a], ...]}
                  -> user: instruction (+ "\n\n" + input when there is one), assistant: output.

Content is a string. An assistant message may instead be a list of parts {"type": "text"|"python"|
"python_output", "text": str} (our tool-use format); user and system messages may be a list of text parts, which
are joined. Other fields of a record are ignored (ids, metadata).

Checks, each a PicochatError naming the file, the line where the record starts and the problem: a file that is
not JSON, a record of no known format, an unknown role, empty content, an unknown part type, a system message
that is not first, roles that do not alternate user, assistant, user, ... With skip_invalid=True such records
are left out instead, and one warning gives their number and the first problem.

Two policies for data that is valid but does not fit our format; both are reported with a warning and counts:
  - Tool turns of other tool formats (ShareGPT "function_call" / "observation", OpenAI "tool" / "function"
    messages and assistant "tool_calls"): picochat's tools are a calculator and a python sandbox, and a model
    trained to emit JSON function calls in their place would call tools that do not exist. So a conversation is
    cut just before its first tool turn; if no complete exchange is left, it is left out. (The records' "tools"
    field, describing the functions, is ignored with them.)
  - A conversation that ends on a user message (4 lines of shared/data/identity/identity_conversations.jsonl):
    that last message is dropped, since there is no reply to learn from.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from picochat.common import PicochatError, read_jsonl, warn
from picochat.tasks.common import GENERATIVE, Task, read_json_list

SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TOOL_ROLES = ("function_call", "observation", "tool", "function", "ipython")
PART_TYPES = ("text", "python", "python_output")


class _ToolTurn:
    """Marks a message of another tool format in a message list (see the module docstring)."""


class Conversations(Task):
    eval_type = GENERATIVE
    baseline = 0.0

    def __init__(self, path: str | os.PathLike, *, skip_invalid: bool = False, name: str | None = None) -> None:
        self.path = Path(path).expanduser()
        self.name = name or self.path.name
        self.lines, self.conversations = [], []
        invalid, first_problem = 0, None
        tool_cut, tool_dropped, trailing_user, first_trailing = 0, 0, 0, None
        total = 0
        for line, record in read_records(self.path):
            total += 1
            where = f"{self.path}:{line}"
            try:
                messages, was_cut, dropped_user = fit_to_our_format(messages_from_record(record, where), where)
            except PicochatError as error:
                if not skip_invalid:
                    raise
                invalid += 1
                first_problem = first_problem or str(error)
                continue
            tool_cut += was_cut
            if dropped_user and not was_cut:
                trailing_user += 1
                first_trailing = first_trailing or where
            if messages is None:
                tool_dropped += 1
                continue
            self.lines.append(line)
            self.conversations.append(messages)
        if total == 0:
            raise PicochatError(f"{self.path}: no conversations in the file")
        if invalid:
            warn(f"{self.path}: skipped {invalid} of {total} conversations with problems (first: {first_problem})")
        if tool_cut:
            warn(
                f"{self.path}: {tool_cut} conversations have function-call / tool turns, which picochat's tools cannot "
                f"run; each was cut before its first such turn, and {tool_dropped} with no exchange left were left out"
            )
        if trailing_user:
            warn(
                f"{self.path}: {trailing_user} conversations ended on a user message, which was dropped "
                f"(first: {first_trailing})"
            )
        if not self.conversations:
            raise PicochatError(f"{self.path}: none of the {total} records is a usable conversation")
        self.skipped = invalid + tool_dropped

    def __len__(self) -> int:
        return len(self.conversations)

    def example(self, index: int) -> dict:
        return {"messages": copy.deepcopy(self.conversations[index])}

    def where(self, index: int) -> str:
        """Where conversation `index` came from, as "file:line" (for messages about it)."""
        return f"{self.path}:{self.lines[index]}"


def read_records(path: Path):
    """(line, record) pairs of a .jsonl / .jsonl.gz / .json file of conversations."""
    if not path.is_file():
        raise PicochatError(f"{path}: conversation file not found")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return read_jsonl(path)
    if path.name.endswith(".json"):
        return read_json_list(path)
    raise PicochatError(f"{path}: unsupported conversation file; expected one of {', '.join(SUFFIXES)}")


def messages_from_record(record: Any, where: str) -> list:
    """Our messages [{"role", "content"}] from a record of any supported format, with each tool turn of another
    tool format replaced by the _ToolTurn marker. Message-level problems raise PicochatError."""
    if isinstance(record, list):
        return [_openai_message(message, where, index) for index, message in enumerate(record)]
    if not isinstance(record, dict):
        raise PicochatError(
            f"{where}: expected a conversation record (a JSON object or list), got {type(record).__name__}"
        )
    if "messages" in record:
        if not isinstance(record["messages"], list):
            raise PicochatError(f'{where}: field "messages" must be a list of messages')
        return [_openai_message(message, where, index) for index, message in enumerate(record["messages"])]
    if "conversations" in record:
        return _sharegpt_messages(record, where)
    if "instruction" in record or "output" in record:
        return _alpaca_messages(record, where)
    raise PicochatError(
        f'{where}: unknown record format; expected {{"messages": [...]}} (OpenAI), {{"conversations": [...]}} '
        '(ShareGPT), {"instruction", "output"} (Alpaca) or a list of messages'
    )


def _openai_message(message: Any, where: str, index: int):
    if not isinstance(message, dict):
        raise PicochatError(f"{where}: message {index} must be an object with role and content")
    role = message.get("role")
    if role in TOOL_ROLES or (role == "assistant" and (message.get("tool_calls") or message.get("function_call"))):
        return _ToolTurn
    if role not in ("system", "user", "assistant"):
        raise PicochatError(f"{where}: message {index} has role {role!r}; expected system, user or assistant")
    if "content" not in message:
        raise PicochatError(f'{where}: message {index} ({role}) has no "content"')
    return {"role": role, "content": _content(message["content"], role, f"{where}: message {index} ({role})")}


def _sharegpt_messages(record: dict, where: str) -> list:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise PicochatError(f'{where}: field "conversations" must be a list of {{"from", "value"}} objects')
    messages: list = []
    system = record.get("system")
    if system is not None and system != "":
        messages.append({"role": "system", "content": _content(system, "system", f'{where}: field "system"')})
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise PicochatError(f'{where}: conversations[{index}] must be an object {{"from", "value"}}')
        speaker = turn.get("from", turn.get("role"))
        if speaker in TOOL_ROLES:
            messages.append(_ToolTurn)
            continue
        if speaker not in SHAREGPT_ROLES:
            raise PicochatError(
                f"{where}: conversations[{index}] is from {speaker!r}; expected human, gpt, system "
                f"(or the tool turns {', '.join(TOOL_ROLES[:2])})"
            )
        role = SHAREGPT_ROLES[speaker]
        value = turn.get("value", turn.get("content"))
        messages.append(
            {"role": role, "content": _content(value, role, f"{where}: conversations[{index}] ({speaker})")}
        )
    return messages


def _alpaca_messages(record: dict, where: str) -> list:
    instruction = _content(record.get("instruction"), "user", f'{where}: field "instruction"')
    extra = record.get("input", "")
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise PicochatError(f'{where}: field "input" must be a string, got {type(extra).__name__}')
    output = _content(record.get("output"), "assistant", f'{where}: field "output"')
    messages = []
    system = record.get("system")
    if system is not None and system != "":
        messages.append({"role": "system", "content": _content(system, "system", f'{where}: field "system"')})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise PicochatError(f'{where}: field "history" must be a list of [question, answer] pairs')
    for index, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            raise PicochatError(f"{where}: history[{index}] must be a [question, answer] pair")
        messages.append({"role": "user", "content": _content(pair[0], "user", f"{where}: history[{index}][0]")})
        messages.append(
            {"role": "assistant", "content": _content(pair[1], "assistant", f"{where}: history[{index}][1]")}
        )
    messages.append({"role": "user", "content": instruction + ("\n\n" + extra if extra.strip() else "")})
    messages.append({"role": "assistant", "content": output})
    return messages


def _content(content: Any, role: str, where: str) -> str | list[dict]:
    """A message's content, checked: a non-empty string, or a list of parts (assistant: text / python /
    python_output; user and system: text parts only, joined into one string)."""
    if isinstance(content, str):
        if not content.strip():
            raise PicochatError(f"{where}: empty content")
        return content
    if not isinstance(content, list):
        raise PicochatError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    if not content:
        raise PicochatError(f"{where}: empty content (no parts)")
    parts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict):
            raise PicochatError(f'{where}: part {index} must be an object {{"type", "text"}}')
        kind, text = part.get("type"), part.get("text")
        allowed = PART_TYPES if role == "assistant" else ("text",)
        if kind not in allowed:
            raise PicochatError(f"{where}: part {index} has unknown type {kind!r}; expected {', '.join(allowed)}")
        if not isinstance(text, str):
            raise PicochatError(f'{where}: part {index} ({kind}) "text" must be a string')
        if kind != "python_output" and not text.strip():  # a tool may print nothing; the rest must say something
            raise PicochatError(f"{where}: part {index} ({kind}) is empty")
        parts.append({"type": kind, "text": text})
    if role != "assistant":
        return "".join(part["text"] for part in parts)
    return parts


def fit_to_our_format(messages: list, where: str) -> tuple[list | None, bool, bool]:
    """Apply the two policies of the module docstring and check the roles. Returns (messages, or None when a cut
    left no complete exchange; whether it was cut at a tool turn; whether a final user message was dropped)."""
    cut = next((index for index, message in enumerate(messages) if message is _ToolTurn), None)
    if cut is not None:
        messages = messages[:cut]
    check_roles(messages, where)
    dropped_user = bool(messages) and messages[-1]["role"] == "user"
    if dropped_user:
        messages = messages[:-1]
    if not any(message["role"] == "assistant" for message in messages):
        if cut is None:
            raise PicochatError(f"{where}: the conversation has no assistant reply")
        return None, True, dropped_user
    return messages, cut is not None, dropped_user


def check_roles(messages: list, where: str) -> None:
    """Roles: an optional system message first, then user, assistant, user, ... (alternating)."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    for index in range(start, len(messages)):
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        role = messages[index]["role"]
        if role != expected:
            detail = "a system message must come first" if role == "system" else "roles must alternate user, assistant"
            raise PicochatError(f"{where}: message {index} is {role!r} where {expected!r} was expected ({detail})")
