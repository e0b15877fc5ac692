"""The `picochat` command: one subcommand per stage, each a thin call into picochat/stages/.

Every stage module exposes two functions:
    add_arguments(parser)  -- declare its flags (and its own sub-subcommands, e.g. `tokenizer train|eval`)
    run(args) -> int       -- do the work, return the exit status
Stage modules import only the standard library at top level, so building this parser is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from picochat import __version__
from picochat.common import PicochatError, setup_logging

# (subcommand, module, one-line help). Listed in pipeline order; this is the whole table, not a registry.
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("run", "picochat.stages.run", "the whole pipeline in one resumable command (--preset cpu|d12|speedrun)"),
    ("data", "picochat.stages.data", "list, check and download text shards"),
    ("tokenizer", "picochat.stages.tokenizer", "train and evaluate the byte-level BPE tokenizer"),
    ("pretrain", "picochat.stages.pretrain", "pretrain the GPT (size from --depth), with exact resume"),
    ("sft", "picochat.stages.sft", "supervised fine-tuning on a task mixture (--stage mid for midtraining)"),
    ("rl", "picochat.stages.rl", "reinforcement learning on GSM8K"),
    ("eval", "picochat.stages.evaluate", "evaluate a model: CORE, bits per byte, chat benchmarks"),
    ("chat", "picochat.stages.chat", "talk to a trained model in the terminal (or one-shot with -p)"),
    ("serve", "picochat.stages.serve", "serve the web chat UI and an OpenAI-compatible API"),
    ("export", "picochat.stages.export", "export a trained model (Hugging Face format)"),
    ("report", "picochat.stages.report", "write the run's report card (report.md with tables and plots)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="picochat",
        description="Train your own small ChatGPT end to end: data -> tokenizer -> pretrain -> SFT -> RL -> chat.",
    )
    parser.add_argument("--version", action="version", version=f"picochat {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more detailed logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in SUBCOMMANDS:
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_stage_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    setup_logging(args.verbose)
    try:
        return int(args._stage_module.run(args) or 0)
    except PicochatError as error:
        # A user mistake: one clear line, no traceback.
        print(f"picochat: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("picochat: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `picochat ... | head` closed the pipe: not an error worth a traceback.
        return 0
