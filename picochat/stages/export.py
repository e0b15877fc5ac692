"""`picochat export`: write a trained model in another format: a Hugging Face model folder, or (portable models)
a GGUF file for llama.cpp / Ollama.

    picochat export --run myrun                      # -> $PICOCHAT_HOME/runs/myrun/export/hf
    picochat export --run myrun --stage base --step 2000 --out ~/hf/myrun-base --force
    picochat export --run myrun --format gguf --quant q8_0   # -> .../export/gguf/{model.gguf, Modelfile}

The folder loads with transformers (AutoModelForCausalLM with trust_remote_code=True, AutoTokenizer); see
picochat/export.py for what it holds. The folder's path is printed on stdout.
"""

from __future__ import annotations

import argparse

from picochat.common import PicochatError, add_model_arguments, resolve_run_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=["hf", "gguf"],
        default="hf",
        help="hf: a Hugging Face transformers model folder (the default); gguf: model.gguf + an Ollama Modelfile for "
        "llama.cpp / Ollama / LM Studio (portable models only: `picochat run --architecture portable`)",
    )
    parser.add_argument(
        "--quant",
        choices=["f32", "f16", "q8_0"],
        default=None,
        help="gguf: the matrices' type (f16, the default; q8_0 halves the file again)",
    )
    add_model_arguments(parser, "stage to export")
    parser.add_argument("--out", help="output folder (default: <run>/export/hf or <run>/export/gguf)")
    parser.add_argument("--force", action="store_true", help="replace the output folder if it exists and is not empty")


def run(args: argparse.Namespace) -> int:
    from picochat.export import export_hf

    if args.quant is not None and args.format != "gguf":
        raise PicochatError(f"--quant {args.quant}: only for --format gguf")
    run_dir = resolve_run_dir(args.run, args.run_dir)
    if not run_dir.is_dir():
        raise PicochatError(f"{run_dir}: no such run folder (train one with `picochat pretrain`)")
    if args.format == "gguf":
        from picochat.export_portable import export_gguf

        out_dir = export_gguf(run_dir, args.out, stage=args.stage, step=args.step, quant=args.quant or "f16",
                              force=args.force)  # fmt: skip
    else:
        out_dir = export_hf(run_dir, args.out, stage=args.stage, step=args.step, force=args.force)
    print(out_dir)
    return 0
