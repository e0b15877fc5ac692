"""`picochat run`: data -> tokenizer -> pretrain -> base eval -> SFT -> chat eval -> [RL] -> report, in one command.

    picochat run --preset cpu                          # a 2-core machine: everything in about 20 minutes
    picochat run --preset d12 --run d12                # one GPU
    picochat run --preset speedrun --run speedrun      # 8 GPUs (torchrun is started for you)
    picochat run --preset cpu --depth 6 --rl           # any setting of the preset can be overridden
    picochat run --preset speedrun --dry-run           # the plan: settings, stages, shapes, tokens, time

Run the same command again after an interruption (Ctrl-C, kill -9, power loss) and it continues where it stopped:
finished stages are skipped, an interrupted training stage resumes exactly (picochat/pipeline.py explains how).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from picochat.common import (
    PicochatError,
    add_run_arguments,
    log,
    print_table,
    resolve_data_dir,
    resolve_run_dir,
    typable_command,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from picochat.common import nonempty_text
    from picochat.presets import PRESETS, setting_fields

    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="the recipe to start from (cpu)")
    add_run_arguments(parser, default_name="the preset's name")
    parser.add_argument("--data-dir", help="data folder (default: $PICOCHAT_DATA_DIR or $PICOCHAT_HOME/data)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the settings and the plan (stages, shapes, tokens, estimated time) and stop",
    )
    group = parser.add_argument_group("preset settings (each overrides the preset's value; 'auto' = derived)")
    for item in setting_fields():
        flag = "--" + item.name.replace("_", "-")
        if item.metadata["parse"] is None:
            group.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction, default=None,
                               help=item.metadata["help"])  # fmt: skip
        else:
            metavar = item.metadata.get("metavar", "TEXT" if item.metadata["parse"] is nonempty_text else "N")
            group.add_argument(
                flag,
                dest=item.name,
                type=item.metadata["parse"],
                default=argparse.SUPPRESS,
                metavar=metavar,
                help=item.metadata["help"],
            )


def resolve_preset(args: argparse.Namespace):
    """The preset with the flags given on the command line applied, and the names of those flags."""
    import dataclasses

    from picochat.presets import PRESETS, setting_fields

    overrides = {}
    for item in setting_fields():
        if item.name in vars(args) and getattr(args, item.name) is not None:
            overrides[item.name] = getattr(args, item.name)
        elif item.metadata["parse"] is not None and item.name in vars(args):
            overrides[item.name] = None  # an explicit "auto"
    try:
        preset = dataclasses.replace(PRESETS[args.preset], **overrides)
    except ValueError as error:
        raise PicochatError(str(error)) from None
    return preset, sorted(overrides)


def finished_message(run_dir: Path) -> str:
    """What to do next, as commands that work when pasted into the shell that ran the pipeline."""
    picochat = typable_command()
    where = f"--run-dir {shlex.quote(str(run_dir))}"
    lines = [
        f"\nDone. The report card: {run_dir / 'report.md'}",
        "Talk to your model:",
        f'  {picochat} chat {where} -p "What is your name?"',
        f"  {picochat} chat {where}            # interactive",
        f"  {picochat} serve {where}           # web UI at http://127.0.0.1:8000, OpenAI API under /v1",
    ]
    if picochat != "picochat":
        activate = Path(sys.executable).parent / "activate"
        lines.append(f"(or `source {shlex.quote(str(activate.absolute()))}` once, then type `picochat ...`)")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from picochat import pipeline
    from picochat.planning import describe_plan

    preset, overridden = resolve_preset(args)
    run_dir = resolve_run_dir(args.run or args.preset, args.run_dir)
    data_dir = resolve_data_dir(args.data_dir).resolve()
    run_dir = run_dir.resolve()
    rows = [{"setting": name, "value": "auto" if value is None else value,
             "from": "flag" if name in overridden else f"preset {args.preset}"}
            for name, value in preset.as_dict().items()]  # fmt: skip
    log(f"preset {args.preset}, run folder {run_dir}, data {data_dir}\n" + print_table(rows))
    if args.dry_run:
        print(describe_plan(preset, args.preset, run_dir, data_dir))
        return 0
    if not preset.download_shards and not data_dir.is_dir():
        raise PicochatError(f"data folder {data_dir} does not exist: give --data-dir (or set $PICOCHAT_DATA_DIR), "
                            "or use --download-shards N to fetch public pretraining shards into it")  # fmt: skip
    status = pipeline.run_pipeline(preset, args.preset, run_dir, data_dir)
    if status == 0:
        print(finished_message(run_dir), flush=True)
    return status
