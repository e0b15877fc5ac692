"""`picochat export`: write a trained model in another format. Today: a Hugging Face model folder.

    picochat export --run myrun                      # -> $PICOCHAT_HOME/runs/myrun/export/hf
    picochat export --run myrun --stage base --step 2000 --out ~/hf/myrun-base --force

The folder loads with transformers (AutoModelForCausalLM with trust_remote_code=True, AutoTokenizer); see
picochat/export.py for what it holds. The folder's path is printed on stdout.
"""

from __future__ import annotations

import argparse

from picochat.common import PicochatError, resolve_run_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format", choices=["hf"], default="hf", help="hf: a Hugging Face transformers model folder (the default)"
    )
    parser.add_argument("--run", help="run name: the folder $PICOCHAT_HOME/runs/<run> (default: default)")
    parser.add_argument("--run-dir", help="run folder path (overrides --run)")
    parser.add_argument("--stage", help="stage to export: base, sft, rl (default: the newest one with weights)")
    parser.add_argument("--step", type=int, help="checkpoint step of that stage (default: its latest weights)")
    parser.add_argument("--out", help="output folder (default: <run>/export/hf)")
    parser.add_argument("--force", action="store_true", help="replace the output folder if it exists and is not empty")


def run(args: argparse.Namespace) -> int:
    from picochat.export import export_hf

    if args.step is not None and args.step < 0:
        raise PicochatError(f"--step {args.step}: expected a checkpoint step (>= 0)")
    run_dir = resolve_run_dir(args.run, args.run_dir)
    if not run_dir.is_dir():
        raise PicochatError(f"{run_dir}: no such run folder (train one with `picochat pretrain`)")
    out_dir = export_hf(run_dir, args.out, stage=args.stage, step=args.step, force=args.force)
    print(out_dir)
    return 0
