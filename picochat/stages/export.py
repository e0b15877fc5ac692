"""`picochat export`: write a trained model in another format. Today: a Hugging Face model folder.

    picochat export --run myrun                      # -> $PICOCHAT_HOME/runs/myrun/export/hf
    picochat export --run myrun --stage base --step 2000 --out ~/hf/myrun-base --force

The folder loads with transformers (AutoModelForCausalLM with trust_remote_code=True, AutoTokenizer); see
picochat/export.py for what it holds. The folder's path is printed on stdout.
"""

from __future__ import annotations

import argparse

from picochat.common import PicochatError, add_model_arguments, resolve_run_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format", choices=["hf"], default="hf", help="hf: a Hugging Face transformers model folder (the default)"
    )
    add_model_arguments(parser, "stage to export")
    parser.add_argument("--out", help="output folder (default: <run>/export/hf)")
    parser.add_argument("--force", action="store_true", help="replace the output folder if it exists and is not empty")


def run(args: argparse.Namespace) -> int:
    from picochat.export import export_hf

    run_dir = resolve_run_dir(args.run, args.run_dir)
    if not run_dir.is_dir():
        raise PicochatError(f"{run_dir}: no such run folder (train one with `picochat pretrain`)")
    out_dir = export_hf(run_dir, args.out, stage=args.stage, step=args.step, force=args.force)
    print(out_dir)
    return 0
