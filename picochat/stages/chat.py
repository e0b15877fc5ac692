"""`picochat chat`: talk to a trained model in the terminal, or ask one question with -p.

The reply streams as it is generated. Tool calls the model makes and the results forced back into its context are
shown apart from its prose. The conversation is kept as messages; when it outgrows the model's context, the oldest
exchanges are dropped (with a notice), so a long chat never crashes. Commands: /clear, /temperature T, /topk K,
/help, /quit (Ctrl-D also quits; Ctrl-C stops a reply).
"""

from __future__ import annotations

import argparse
import os
import sys

from picochat.common import PicochatError, add_model_arguments, add_tool_argument, log

# Model text is shown as text: control characters other than newline and tab (ESC sequences could move the cursor,
# recolour or retitle the terminal) are shown as U+FFFD. The history keeps the text as it was generated.
_CONTROL_CHARACTERS = {c: "\ufffd" for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)] if chr(c) not in "\n\t"}

HELP = """commands:
  /clear          forget the conversation (keeps the --system message)
  /temperature T  sampling temperature (0 = greedy)
  /topk K         sample among the K most likely tokens (0 = no limit)
  /help           this list
  /quit           leave (or Ctrl-D)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, "stage to load")
    parser.add_argument("-p", "--prompt", help="one-shot: print the reply to this message and exit")
    parser.add_argument("--system", help="a system message that starts the conversation")
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature, 0 = greedy (0.6)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the K most likely tokens, 0 = all (50)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (off)")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="most tokens per reply (default 256, or half the context)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible replies")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best present)")
    add_tool_argument(parser)


def run(args: argparse.Namespace) -> int:
    from picochat.engine import check_sampling

    top_k = args.top_k or None
    check_sampling(args.temperature, top_k, args.top_p)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise PicochatError(f"--max-tokens {args.max_tokens}: expected a positive integer")
    from picochat import load_engine

    engine, _, stage_dir = load_engine(
        args.run, args.run_dir, stage=args.stage, step=args.step, device=args.device, tool=args.tool
    )
    layers = engine.model.config.n_layer
    log(f"chat: {stage_dir} ({layers} layers, context {engine.context_len} tokens) on {engine.device}")
    max_tokens = engine.reply_budget(args.max_tokens)
    chat = Chat(engine, args.system, args.temperature, top_k, args.top_p, max_tokens, args.seed)
    if args.prompt is not None:
        chat.reply(args.prompt)
        return 0
    return chat.interactive()


class Chat:
    """One conversation: its messages, its sampling settings, and how replies are shown."""

    def __init__(self, engine, system, temperature, top_k, top_p, max_tokens, seed):
        self.engine = engine
        self.system = system
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.max_tokens, self.seed = max_tokens, seed
        self.messages = self._fresh_messages()
        self.color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")

    def _fresh_messages(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str) -> None:
        """Add a user message, stream the assistant's reply to stdout, keep both in the history."""
        messages = [*self.messages, {"role": "user", "content": text}]
        # Drop the oldest exchanges now (one notice), so the history never outgrows the context.
        self.messages, _ = self.engine.fit_conversation(messages, self.max_tokens)
        parts: list[dict] = []
        try:
            pieces = self.engine.stream_chat(
                self.messages, max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                top_p=self.top_p, seed=self.seed,
            )  # fmt: skip
            for piece in pieces:
                self._show(piece, parts)
        except KeyboardInterrupt:
            self._write("\n[reply interrupted]")
        finally:
            self._write("\n")
            self.messages.append({"role": "assistant", "content": parts or ""})

    def _show(self, piece, parts: list[dict]) -> None:
        previous = parts[-1]["type"] if parts else "text"
        if parts and previous == piece.kind:
            parts[-1]["text"] += piece.text
        else:
            parts.append({"type": piece.kind, "text": piece.text})
        if piece.kind != previous:  # a tool call, its result, and back to prose are shown on their own
            label = {"python": "\n  [tool call] ", "python_output": "\n  [tool result] ", "text": "\n"}[piece.kind]
            self._write(self._style(label, "2"))
        color = {"text": None, "python": "36", "python_output": "32"}[piece.kind]  # cyan call, green result
        self._write(self._style(piece.text.translate(_CONTROL_CHARACTERS), color))

    def _style(self, text: str, code: str | None) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color and code else text

    @staticmethod
    def _write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def interactive(self) -> int:
        try:
            import readline  # noqa: F401  (line editing and history for input(), where available)
        except ImportError:
            pass
        print("picochat chat: type a message; /help lists the commands, /quit leaves.")
        while True:
            try:
                line = input("\nUser: ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not line:
                continue
            if line.startswith("/"):
                if not self._command(line):
                    return 0
                continue
            self._write("Assistant: ")
            try:
                self.reply(line)
            except PicochatError as error:  # e.g. a message too long for the context: say so, keep chatting
                print(f"error: {error}")

    def _command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        from picochat.engine import check_sampling

        name, _, value = line.partition(" ")
        value = value.strip()
        try:
            if name in ("/quit", "/exit"):
                return False
            if name == "/clear":
                self.messages = self._fresh_messages()
                print("(conversation cleared)")
            elif name == "/temperature":
                temperature = float(value)
                check_sampling(temperature, self.top_k, self.top_p)
                self.temperature = temperature
                print(f"(temperature {temperature:g})")
            elif name == "/topk":
                top_k = int(value) or None
                check_sampling(self.temperature, top_k, self.top_p)
                self.top_k = top_k
                print(f"(top-k {top_k or 'off'})")
            elif name == "/help":
                print(HELP)
            else:
                print(f"unknown command {name}; /help lists the commands")
        except ValueError:
            print(f"{name} needs a number, e.g. {name} {'0.8' if name == '/temperature' else '50'}")
        except PicochatError as error:
            print(f"error: {error}")
        return True
