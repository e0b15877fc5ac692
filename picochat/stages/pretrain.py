"""`picochat pretrain`: pretrain the run's GPT; its size, batch, learning rates and horizon follow from --depth.

    picochat pretrain --depth 12 --run d12                     # everything else derived (printed and saved)
    picochat pretrain --resume --run d12                       # continue exactly where it stopped
    picochat pretrain --resume 1500 --run d12                  # ... or from an earlier checkpoint
    torchrun --standalone --nproc_per_node=8 -m picochat pretrain --depth 24 --run d24      # 8 GPUs, one node

Several nodes (the run folder must be on storage that every node reads; only global rank 0 writes it):

    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=<0 or 1> --rdzv_backend=c10d \\
             --rdzv_endpoint=<host of node 0>:29500 --rdzv_id=<any id> -m picochat pretrain --depth 26 --run d26

The same command runs on CPU (gloo) for testing: torchrun --nproc_per_node=2 -m picochat pretrain --device cpu ...
A resumed run may use a different number of ranks: accumulation adapts, the rows of every step stay the same.
torchrun reads abbreviated options anywhere on its command line and takes `--run` for its own `--run-path`: name
the run with --run-dir, or put `--` before the subcommand (`torchrun ... -m picochat -- pretrain --run d24 ...`).

The depth dial (width, heads, batch, horizon, learning rates, weight decay from --depth) is picochat/scaling.py.
Writes <run>/base/: config.json (every flag and derived value, data files, tokenizer hash, git commit),
metrics.jsonl, checkpoints in state/ and model.safetensors (see picochat/checkpoint.py).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any

from picochat.common import (
    PicochatError,
    add_training_arguments,
    atomic_write_json,
    log,
    print_table,
    resolve_data_dir,
    resolve_run_dir,
    typable_command,
    warn,
)
from picochat.scaling import derive_plan
from picochat.settings import PretrainSettings, add_flags, as_flags, defaults, resolve, train_settings

# The reference's seven greedy-sample prompts (16 tokens each): a quick look at what the model knows.
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]
DEFAULTS = defaults(PretrainSettings)  # {flag: default}, for scripts that build flags by hand

# ----------------------------------------------------------------------------------------------------------
# Flags (validated by argparse: a bad value is a usage error with exit status 2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("run")
    add_training_arguments(where)
    where.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model and the optimizer updates (default: on for CUDA, off elsewhere)",
    )
    where.add_argument("--wandb-run", help="also log to Weights & Biases under this run name (needs wandb)")
    groups = {
        "run": where,
        "model": parser.add_argument_group("model (the depth dial)"),
        "horizon": parser.add_argument_group("horizon and batch (first given wins: iterations > flops > ratio)"),
        "optim": parser.add_argument_group("optimization (learning rates before the batch-size scaling)"),
        "cadence": parser.add_argument_group("evaluation and checkpoints"),
    }
    add_flags(parser, PretrainSettings, groups)


def resolve_flags(args: argparse.Namespace, saved: dict[str, Any] | None) -> dict[str, Any]:
    """Flag values: given on the command line > saved in config.json (on --resume) > the declared defaults
    (picochat/settings.py). A resume may not change what defines the model or the data stream."""
    given = argparse.Namespace(**{**vars(args), "paths": _absolute(args.paths) or None, "val": _absolute(args.val)})
    return as_flags(resolve(PretrainSettings, given, saved))


def _absolute(paths: list | None) -> list[str]:
    return [str(Path(p).expanduser().resolve()) for p in paths or []]


# ----------------------------------------------------------------------------------------------------------
# The stage


def run(args: argparse.Namespace) -> int:
    # Both must be set before torch loads its libraries (they only take effect in a fresh process).
    # Fewer out-of-memory errors from fragmentation on GPUs:
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    # OpenMP threads that finish a parallel region first sleep instead of spinning. On a CPU shared with other work
    # (the usual case for CPU training), spinning threads burn the time slices the last thread needs: measured on 2
    # shared cores, d4 trained 3.4x faster (199 -> 672 tokens/s); on an idle machine the difference is small.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from picochat.checkpoint import load_checkpoint, provenance, read_stage_config, resume_point
    from picochat.data import TextFormat, default_pretraining_files, find_text_files, split_train_val
    from picochat.gpt import GPT, GPTConfig
    from picochat.hardware import compute_dtype, distributed_session
    from picochat.packing import pretraining_batches
    from picochat.tokenizer import Tokenizer, split_pattern_name
    from picochat.trainer import Trainer

    run_dir = resolve_run_dir(args.run, args.run_dir)
    stage_dir = run_dir / "base"
    resume_from = resume_point(stage_dir, args.resume, holds="a pretraining run")
    saved_config = None if resume_from is None else read_stage_config(stage_dir).get("flags")
    flags = resolve_flags(args, saved_config)
    if args.wandb_run:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise PicochatError("--wandb-run needs the wandb package, which is not installed (pip install wandb)")

    tokenizer_dir = run_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise PicochatError(f"no tokenizer in {tokenizer_dir}: run `picochat tokenizer train "
                            f"{'--run-dir ' + str(run_dir) if args.run_dir else '--run ' + (args.run or 'default')}` "
                            "first")  # fmt: skip
    tokenizer = Tokenizer.load(tokenizer_dir)
    if flags["architecture"] == "portable" and args.window_pattern and "S" in args.window_pattern:
        raise PicochatError(f"--window-pattern {args.window_pattern}: the portable architecture has no sliding windows")
    if flags["architecture"] == "portable" and split_pattern_name(tokenizer.pattern) != "llama-bpe":
        warn(
            f"{tokenizer_dir}: this tokenizer does not split text as llama.cpp's llama-bpe does, so the portable "
            "model will export to Hugging Face but not to GGUF (train the tokenizer with --split-pattern llama-bpe)"
        )
    tokenizer_sha256 = hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()
    train_files, val_files = _data_files(flags, args.data_dir, find_text_files, split_train_val,
                                         default_pretraining_files)  # fmt: skip
    text_format = TextFormat(text_column=flags["text_column"])

    with distributed_session(args.device) as ranks:
        plan = derive_plan(flags, tokenizer.vocab_size, ranks.world_size)
        device = ranks.device
        use_compile = device.type == "cuda" if args.compile is None else args.compile
        _log_plan(flags, plan, device, compute_dtype(device), train_files, val_files)

        torch.manual_seed(flags["seed"])  # the same initial weights on every rank (there is no broadcast)
        model = GPT.build(GPTConfig.from_dict(plan["model_config"]), device)
        embedding_dtype = resolve_embedding_dtype(flags["embedding_dtype"], device, model.compute_dtype)
        model.store_embeddings_in(embedding_dtype)
        log(f"token and value embeddings stored in {str(embedding_dtype).removeprefix('torch.')}")
        if flags["fp8"]:
            from picochat.fp8 import enable_fp8

            enable_fp8(model, device)
        optimizer = model.setup_optimizer(
            unembedding_lr=plan["unembedding_lr"], embedding_lr=plan["embedding_lr"], matrix_lr=plan["matrix_lr"],
            weight_decay=plan["weight_decay"], scalar_lr=plan["scalar_lr"], compile=use_compile,
        )  # fmt: skip
        settings = train_settings(
            flags,
            total_batch_size=plan["total_batch_size"],
            seq_len=flags["max_seq_len"],
            num_iterations=plan["num_iterations"],
            compile=use_compile,
            wandb_run=args.wandb_run,
        )

        def train_loader(**layout):
            return pretraining_batches(train_files, tokenizer, device=device, text_format=text_format, **layout)

        def val_loader(**layout):
            return pretraining_batches(val_files, tokenizer, device=device, text_format=text_format, **layout)

        location = f"--run-dir {run_dir}" if args.run_dir else f"--run {args.run or 'default'}"
        config = {
            "stage": "pretrain",
            "model": plan["model_config"],  # the shape readers build the model from (checkpoint.load_model)
            "flags": flags,
            "derived": plan,
            "data": {"train_files": [str(p) for p in train_files], "val_files": [str(p) for p in val_files]},
            "tokenizer": {"path": str(tokenizer_dir), "sha256": tokenizer_sha256, "vocab_size": tokenizer.vocab_size},
            "provenance": provenance(device, compute_dtype(device), ranks.world_size, use_compile, resume_from),
        }
        trainer = Trainer(
            model, optimizer, settings, stage_dir=stage_dir, ranks=ranks, make_train_loader=train_loader,
            make_val_loader=val_loader if val_files else None, token_bytes=tokenizer.token_bytes(),
            sample=lambda m: greedy_samples(m, tokenizer),
            resume_settings={"model_config": plan["model_config"], "tokenizer_sha256": tokenizer_sha256},
            resume_hint=f"{typable_command()} pretrain --resume {location}", wandb_config=config,
        )  # fmt: skip
        if resume_from is not None:
            trainer.restore(load_checkpoint(stage_dir, resume_from))
        if ranks.is_main:
            atomic_write_json(stage_dir / "config.json", config)
        start = time.perf_counter()
        step = trainer.run()
        if step >= settings.num_iterations:
            best = "n/a" if math.isinf(trainer.min_val_bpb) else f"{trainer.min_val_bpb:.4f}"
            log(f"pretraining done: {step:,} steps in {(time.perf_counter() - start) / 60:.1f} min "
                f"(training time {trainer.training_seconds / 60:.1f} min), best validation bpb {best}; "
                f"weights in {stage_dir / 'model.safetensors'}")  # fmt: skip
    return 0


def resolve_embedding_dtype(name: str, device, compute_dtype):
    """--embedding-dtype: "auto" is bfloat16 on CUDA when the model computes in bf16 (the reference's storage), else
    float32."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and compute_dtype == torch.bfloat16 else torch.float32
    return getattr(torch, name)


def greedy_samples(model, tokenizer, prompts: list[str] = SAMPLE_PROMPTS, max_tokens: int = 16):
    """[(prompt, completion)]: each prompt (BOS first) continued with the most likely token, max_tokens times, by
    a plain loop without KV cache (7 short prompts: cheap enough)."""
    import torch

    samples = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer.encode(prompt, prepend=tokenizer.bos_token_id)
            prompt_length = len(ids)
            for _ in range(max_tokens):
                context = torch.tensor([ids[-model.config.sequence_len :]], device=model.device)
                ids.append(int(model(context)[0, -1].argmax()))
            samples.append((prompt, tokenizer.decode(ids[prompt_length:])))
    return samples


def _data_files(flags, data_dir, find_text_files, split_train_val, default_pretraining_files):
    """(train files, val files). flags["paths"] is filled in with the default corpus when empty, so that config.json
    names the exact files and a resume reads the same ones."""
    if not flags["paths"]:
        flags["paths"] = _absolute(default_pretraining_files(resolve_data_dir(data_dir)))
    paths = flags["paths"]
    if flags["val"]:
        train_files, val_files = find_text_files(paths), find_text_files(flags["val"])
        overlap = set(train_files) & set(val_files)
        if overlap:
            raise PicochatError(f"--val: {sorted(map(str, overlap))[0]} is also a training file")
    else:
        train_files, val_files = split_train_val(find_text_files(paths))
    if not train_files:
        raise PicochatError(f"no training files in {[str(p) for p in paths]} (files named val* are held out)")
    if not val_files:
        warn("no validation files (name one val* or pass --val): validation bpb is not measured")
    return train_files, val_files


def _log_plan(flags, plan, device, dtype, train_files, val_files) -> None:
    config = plan["model_config"]
    rows = [
        {"setting": "model", "value": f"depth {config['n_layer']}, width {config['n_embd']}, {config['n_head']} heads "
                                      f"of {config['n_embd'] // config['n_head']}, windows {plan['window_sizes']}"},
        {"setting": "parameters",
         "value": f"{plan['parameters']['total']:,} total, {plan['scaling_params']:,} scaling"},
        {"setting": "vocab / seq len", "value": f"{config['vocab_size']:,} / {config['sequence_len']:,}"},
        {"setting": "FLOPs per token", "value": f"{plan['flops_per_token']:.3e}"},
        {"setting": "target tokens D / D_ref", "value": f"{plan['target_tokens']:,} / {plan['reference_tokens']:,}"},
        {"setting": "total batch size", "value": f"{plan['total_batch_size']:,} tokens ({plan['batch_source']})"},
        {"setting": "steps", "value": f"{plan['num_iterations']:,} ({plan['horizon_source']})"},
        {"setting": "training tokens / FLOPs",
         "value": f"{plan['training_tokens']:,} ({plan['tokens_per_scaling_param']:.2f} per scaling param) / "
                  f"{plan['training_flops']:.3e}"},
        {"setting": "ranks x device batch x accum",
         "value": f"{plan['world_size']} x {flags['device_batch_size']} rows x {plan['gradient_accumulation']}"},
        {"setting": "LRs (x batch scale)",
         "value": f"embedding {plan['embedding_lr']:.4g}, unembedding {plan['unembedding_lr']:.4g}, matrix "
                  f"{plan['matrix_lr']:.4g}, scalar {plan['scalar_lr']:.4g} (x {plan['batch_lr_scale']:.4f})"},
        {"setting": "Muon weight decay", "value": f"{plan['weight_decay']:.4g} (cosine to 0)"},
        {"setting": "device / compute dtype", "value": f"{device} / {str(dtype).removeprefix('torch.')}"},
        {"setting": "data", "value": f"{len(train_files)} training files, {len(val_files)} validation files"},
    ]  # fmt: skip
    for line in print_table(rows).splitlines():
        log(line)
