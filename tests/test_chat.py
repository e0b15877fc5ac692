"""`picochat chat`: one-shot replies, an interactive session driven through a pseudo-terminal, commands, history
kept within the context, tool calls shown apart, and clear errors."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch
from helpers import tiny_model

from picochat.checkpoint import save_checkpoint
from picochat.cli import main
from picochat.common import atomic_write_json
from picochat.engine import Engine, Piece
from picochat.gpt import GPT
from picochat.stages.chat import Chat


def chat_model(vocab_size: int, sequence_len: int = 128) -> GPT:
    """helpers.tiny_model with a random lm_head: the init's (std 0.001) predicts nearly uniformly."""
    model = tiny_model(vocab_size, sequence_len)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    """A tiny run folder made the way the pipeline makes one: tokenizer/ + base/{config.json, weights}."""
    run = tmp_path_factory.mktemp("run")
    tokenizer.save(run / "tokenizer")
    model = chat_model(tokenizer.vocab_size)
    save_checkpoint(run / "base", 1, model.state_dict(), {})
    atomic_write_json(run / "base" / "config.json", {"model": model.config.to_dict()})
    return run


def test_one_shot_prompt(run_dir, capsys):
    arguments = ["chat", "--run-dir", str(run_dir), "-p", "Hello", "--max-tokens", "12", "--seed", "1"]
    assert main(arguments) == 0
    first = capsys.readouterr().out
    assert first.endswith("\n") and "<|" not in first  # special tokens are never printed
    assert main(arguments) == 0
    assert capsys.readouterr().out == first  # same seed, same reply
    assert main([*arguments[:-2], "--temperature", "0", "--stage", "base", "--step", "1", "--tool", "none"]) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "-1"], "temperature -1"),
        (["--top-p", "2"], "top_p 2"),
        (["--max-tokens", "0"], "--max-tokens 0"),
        (["--max-tokens", "200"], "no room for the conversation in the model's context of 128"),
        (["--stage", "sft"], "no trained model"),
        (["--step", "7"], "no checkpoint at step 7"),
        (["--device", "nonsense"], "--device 'nonsense'"),
    ],
)
def test_mistakes_are_one_line_errors(run_dir, capsys, extra, message):
    assert main(["chat", "--run-dir", str(run_dir), "-p", "Hello", *extra]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("picochat: error:") and message in error


def test_missing_run_is_an_error(tmp_path, capsys):
    assert main(["chat", "--run-dir", str(tmp_path / "nothing"), "-p", "Hi"]) == 2
    assert "no such run folder" in capsys.readouterr().err


class Terminal:
    """A child process on a pseudo-terminal, read until expected text shows up (a tiny `expect`)."""

    def __init__(self, arguments: list[str]):
        self.master, slave = pty.openpty()
        environment = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "PICOCHAT_NO_PROGRESS": "1"}
        self.process = subprocess.Popen(arguments, stdin=slave, stdout=slave, stderr=slave, env=environment,
                                        close_fds=True)  # fmt: skip
        os.close(slave)
        self.seen = ""

    def expect(self, text: str, timeout: float = 60.0) -> str:
        """Everything read up to and including `text`."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"{text!r} not seen; the terminal shows:\n{self.seen[-2000:]}")
            if select.select([self.master], [], [], min(remaining, 0.5))[0]:
                try:
                    self.seen += os.read(self.master, 4096).decode("utf-8", errors="replace")
                except OSError:  # the child closed the terminal
                    pass
        upto = self.seen.index(text) + len(text)
        before, self.seen = self.seen[:upto], self.seen[upto:]
        return before

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.process.wait(timeout=30)
        finally:
            os.close(self.master)


def test_interactive_session_through_a_terminal(run_dir):
    terminal = Terminal(
        [sys.executable, "-m", "picochat", "chat", "--run-dir", str(run_dir), "--max-tokens", "10", "--seed", "0"]
    )
    try:
        terminal.expect("/help lists the commands")
        for message in ("Hello there", "What is 2+2?"):
            terminal.expect("User: ")
            terminal.send(message)
            terminal.expect("Assistant: ")
        terminal.expect("User: ")
        terminal.send("/clear")
        terminal.expect("(conversation cleared)")
        terminal.expect("User: ")
        terminal.send("/temperature 0")
        terminal.expect("(temperature 0)")
        terminal.expect("User: ")
        terminal.send("/topk 5")
        terminal.expect("(top-k 5)")
        terminal.expect("User: ")
        terminal.send("/temperature hot")
        terminal.expect("/temperature needs a number")
        terminal.expect("User: ")
        terminal.send("/help")
        terminal.expect("/quit")
        terminal.expect("User: ")
        terminal.send("A third message")
        terminal.expect("Assistant: ")
        terminal.expect("User: ")
        terminal.send("/quit")
        assert terminal.close() == 0
    finally:
        if terminal.process.poll() is None:
            terminal.process.kill()
            terminal.process.wait()


def test_history_stays_within_the_context(tokenizer, monkeypatch, capsys):
    notices = []
    monkeypatch.setattr("picochat.engine.warn", notices.append)
    engine = Engine(chat_model(tokenizer.vocab_size, sequence_len=64), tokenizer)
    chat = Chat(engine, "You are terse.", temperature=1.0, top_k=None, top_p=None, max_tokens=16, seed=0)
    for i in range(12):
        chat.reply(f"message number {i} with a few words")
        _, prompt = engine.fit_conversation(chat.messages + [{"role": "user", "content": "next"}], 16)
        assert len(prompt) + 16 <= 64
    assert chat.messages[0] == {"role": "system", "content": "You are terse."}
    assert chat.messages[-2]["content"] == "message number 11 with a few words"
    assert len(chat.messages) < 1 + 2 * 12 and notices  # old exchanges went, with a notice
    # A message that can never fit is refused without losing the conversation.
    kept = list(chat.messages)
    with pytest.raises(Exception, match="exceeds the model's context"):
        chat.reply("word " * 100)
    assert chat.messages == kept
    capsys.readouterr()


def test_tool_calls_are_shown_apart_and_kept_as_parts(tokenizer, capsys):
    engine = Engine(chat_model(tokenizer.vocab_size), tokenizer)
    chat = Chat(engine, None, temperature=0.0, top_k=None, top_p=None, max_tokens=16, seed=0)
    pieces = [Piece("text", "Let me compute. "), Piece("python", "2+"), Piece("python", "3"),
              Piece("python_output", "5"), Piece("text", "It is 5.\x1b[2J")]  # fmt: skip
    engine.stream_chat = lambda messages, **settings: iter(pieces)
    chat.reply("What is 2+3?")
    shown = capsys.readouterr().out
    # (an escape sequence in model text is shown harmlessly, not sent to the terminal)
    assert shown == "Let me compute. \n  [tool call] 2+3\n  [tool result] 5\nIt is 5.\ufffd[2J\n"
    assert chat.messages[-1] == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "2+3"},
            {"type": "python_output", "text": "5"},
            {"type": "text", "text": "It is 5.\x1b[2J"},
        ],
    }
    # The stored parts render back into a valid conversation for the next turn.
    engine.fit_conversation(chat.messages + [{"role": "user", "content": "thanks"}], 16)
