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

The depth dial (the reference's scaling rules, REFERENCE.md A.4):
  width     model_dim = ceil(depth x aspect_ratio / head_dim) x head_dim; heads = model_dim / head_dim
  horizon   --num-iterations, else --target-flops / (FLOPs per token x batch), else target_tokens / batch with
            target_tokens D = --target-param-data-ratio x scaling params (transformer matrices + lm_head)
  batch     B = 2^round(log2(B_ref x (D / D_ref)^0.383)) tokens (Power Lines), B_ref = 2^19 and D_ref = the same
            ratio x the scaling params of a depth-12 model of the same shape rules; or --total-batch-size
  LRs       every AdamW and Muon learning rate x sqrt(B / B_ref) (not the fixed smear/backout group)
  decay     Muon weight decay = --weight-decay x sqrt(B / B_ref) x D_ref / D, then a cosine to 0 over the run
Writes <run>/base/: config.json (every flag and derived value, data files, tokenizer hash, git commit),
metrics.jsonl, checkpoints in state/ and model.safetensors (see picochat/checkpoint.py).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from picochat.common import (
    PicochatError,
    add_run_arguments,
    atomic_write_json,
    fraction,
    log,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    print_table,
    resolve_data_dir,
    resolve_run_dir,
    resume_step,
    typable_command,
    warn,
)
from picochat.model_config import ARCHITECTURES

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
B_REF = 2**19  # tokens per step of the reference depth-12 run
REF_DEPTH = 12
BATCH_EXPONENT = 0.383  # Power Lines: optimal batch ~ D^0.383

# Flags whose value is kept in config.json and reused by --resume unless given again. None = derived / unset.
DEFAULTS: dict[str, Any] = {
    "paths": [], "val": [], "text_column": "text",
    "depth": 20, "aspect_ratio": 64, "head_dim": 128, "max_seq_len": 2048, "window_pattern": "SSSL",
    "num_iterations": None, "target_flops": None, "target_param_data_ratio": 12.0,
    "total_batch_size": None, "device_batch_size": 32,
    "embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02, "scalar_lr": 0.5, "weight_decay": 0.28,
    "warmup_steps": 40, "warmdown_ratio": 0.65, "final_lr_frac": 0.05,
    "eval_every": 250, "eval_tokens": 80 * 524_288, "sample_every": 2000, "save_every": 0, "keep_checkpoints": 2,
    "seed": 42, "batch_lr_scale": None, "muon_weight_decay": None, "fp8": False,
    "embedding_dtype": "auto", "architecture": "reference",
}  # fmt: skip
# Flags that define the model or the data stream: changing them on --resume is an error, not an override.
# (The schedule may change: a new --num-iterations is allowed, with a warning.)
FIXED_ON_RESUME = ("depth", "aspect_ratio", "head_dim", "max_seq_len", "window_pattern", "total_batch_size",
                   "paths", "val", "text_column", "architecture")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Flags (validated by argparse: a bad value is a usage error with exit status 2)




def window_pattern(text: str) -> str:
    pattern = text.strip().upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise argparse.ArgumentTypeError(f"expected letters S (short window) and L (long), e.g. SSSL, got {text!r}")
    return pattern


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", default=None,
                        help="training text files or folders (.parquet .jsonl .txt ...); default: every parquet shard "
                             "under --data-dir. Files named val* are held out for validation")
    parser.add_argument("--val", nargs="+", default=None, metavar="PATH",
                        help="validation files (then every positional file is used for training)")
    parser.add_argument("--text-column", default=None, help="parquet column / jsonl field with the text (text)")
    where = parser.add_argument_group("run")
    add_run_arguments(where)
    where.add_argument("--data-dir", help="data folder (default: $PICOCHAT_DATA_DIR or $PICOCHAT_HOME/data)")
    where.add_argument("--resume", nargs="?", const="latest", type=resume_step, metavar="STEP",
                       help="continue from the latest checkpoint (or from STEP), exactly; flags not given again are "
                            "taken from the run's config.json")
    where.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    where.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the model and the optimizer updates (default: on for CUDA, off "
                            "elsewhere)")
    where.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=None,
                       help="train the large Linears in FP8 (tensorwise scaling; CUDA compute capability 8.9+, "
                            "emulated on the CPU; never for evaluation). A resume keeps the run's choice unless given")
    where.add_argument("--embedding-dtype", choices=("auto", "float32", "bfloat16"), default=None,
                       help="storage of the token and value embeddings; auto: bfloat16 on CUDA with bf16 compute (as "
                            "the reference; 2.6 GB less per GPU at d24), float32 elsewhere")
    where.add_argument("--wandb-run", help="also log to Weights & Biases under this run name (needs wandb)")
    where.add_argument("--seed", type=non_negative_int, help="seed for the initial weights (42)")

    model = parser.add_argument_group("model (the depth dial)")
    model.add_argument("--depth", type=positive_int, help="number of layers; sets everything else (20)")
    model.add_argument("--aspect-ratio", type=positive_int, help="model width = depth x this (64)")
    model.add_argument("--head-dim", type=positive_int, help="attention head size (128)")
    model.add_argument("--max-seq-len", type=positive_int, help="tokens per training row (2048)")
    model.add_argument("--window-pattern", type=window_pattern, help="S/L sliding windows tiled over layers (SSSL; "
                                                                       "the portable architecture: L only)")
    model.add_argument("--architecture", choices=ARCHITECTURES,
                       help="reference (the default: nanochat's, best quality per FLOP) or portable (a stock Qwen3 "
                            "that llama.cpp, Ollama, MLX, vLLM and plain transformers run; see picochat/portable.py)")

    horizon = parser.add_argument_group("horizon and batch (first given wins: iterations > flops > ratio)")
    horizon.add_argument("--num-iterations", type=positive_int, help="optimizer steps")
    horizon.add_argument("--target-flops", type=positive_float, help="training FLOPs budget")
    horizon.add_argument("--target-param-data-ratio", type=positive_float,
                         help="tokens per scaling parameter (12); also sets the automatic batch size")
    horizon.add_argument("--total-batch-size", type=positive_int, help="tokens per step, all ranks (auto)")
    horizon.add_argument("--device-batch-size", type=positive_int, help="rows per forward pass per rank (32)")

    optim = parser.add_argument_group("optimization (learning rates before the batch-size scaling)")
    optim.add_argument("--embedding-lr", type=positive_float, help="AdamW, token and value embeddings (0.3)")
    optim.add_argument("--unembedding-lr", type=positive_float, help="AdamW, lm_head (0.008)")
    optim.add_argument("--matrix-lr", type=positive_float, help="Muon, block matrices (0.02)")
    optim.add_argument("--scalar-lr", type=positive_float, help="AdamW, per-layer scalars (0.5)")
    optim.add_argument("--weight-decay", type=non_negative_float, help="Muon weight decay before scaling (0.28)")
    optim.add_argument("--batch-lr-scale", type=positive_float,
                       help="override the learning-rate multiplier (default sqrt(total batch / 2^19))")
    optim.add_argument("--muon-weight-decay", type=non_negative_float,
                       help="override the derived Muon weight decay (default --weight-decay x sqrt(B/B_ref) x D_ref/D)")
    optim.add_argument("--warmup-steps", type=non_negative_int, help="linear LR warmup steps (40)")
    optim.add_argument("--warmdown-ratio", type=fraction, help="fraction of the run with LR warmdown (0.65)")
    optim.add_argument("--final-lr-frac", type=fraction, help="LR multiplier at the end of the warmdown (0.05)")

    cadence = parser.add_argument_group("evaluation and checkpoints")
    cadence.add_argument("--eval-every", type=non_negative_int, help="validation bpb every N steps; 0: at the end "
                                                                     "only (250)")  # fmt: skip
    cadence.add_argument("--eval-tokens", type=positive_int, help=f"validation tokens per evaluation ({80 * 524_288})")
    cadence.add_argument("--sample-every", type=non_negative_int, help="greedy samples every N steps; 0: never (2000)")
    cadence.add_argument("--save-every", type=non_negative_int, help="checkpoint every N steps; 0: at the end only")
    cadence.add_argument("--keep-checkpoints", type=positive_int, help="checkpoints kept on disk (2)")


def resolve_flags(args: argparse.Namespace, saved: dict[str, Any] | None) -> dict[str, Any]:
    """Flag values: given on the command line > saved in config.json (on --resume) > DEFAULTS. A resume may not
    change what defines the model or the data stream."""
    flags = {}
    for name, default in DEFAULTS.items():
        given = getattr(args, name, None)
        if given == []:  # no positional paths
            given = None
        if saved is not None and name in saved:
            if given is not None and name in FIXED_ON_RESUME and not _same(given, saved[name]):
                flag = "the data paths" if name == "paths" else f"--{name.replace('_', '-')}"
                raise PicochatError(f"--resume: {flag} was {saved[name]!r} for this run, not {given!r}; resume with "
                                    "the same value, or start a new run")  # fmt: skip
            flags[name] = saved[name] if given is None else given
        else:
            flags[name] = default if given is None else given
    flags["paths"] = _absolute(flags["paths"])
    flags["val"] = _absolute(flags["val"])
    return flags


def _absolute(paths: list | None) -> list[str]:
    return [str(Path(p).expanduser().resolve()) for p in paths or []]


def _same(given: Any, saved: Any) -> bool:
    return _absolute(given) == _absolute(saved) if isinstance(given, list) else given == saved


# ----------------------------------------------------------------------------------------------------------
# The plan: every derived number, from the flags (pure; tested without training)


def derive_plan(flags: dict[str, Any], vocab_size: int, world_size: int) -> dict[str, Any]:
    import torch

    from picochat.gpt import GPT, GPTConfig, model_class
    from picochat.trainer import gradient_accumulation_steps

    architecture = flags["architecture"]
    # The portable architecture has full attention in every layer: the reference's default SSSL does not apply.
    pattern = "L" if architecture == "portable" else flags["window_pattern"]

    def meta_model(depth: int) -> GPT:
        config = GPTConfig.from_depth(depth, aspect_ratio=flags["aspect_ratio"], head_dim=flags["head_dim"],
                                      vocab_size=vocab_size, sequence_len=flags["max_seq_len"],
                                      window_pattern=pattern, architecture=architecture)  # fmt: skip
        with torch.device("meta"):
            return model_class(config)(config, compute_dtype=torch.float32)

    model = meta_model(flags["depth"])
    scaling_params = model.num_scaling_params()
    ratio = flags["target_param_data_ratio"]
    target_tokens = ratio * scaling_params  # D
    reference_tokens = ratio * meta_model(REF_DEPTH).num_scaling_params()  # D_ref
    total_batch_size = flags["total_batch_size"]
    batch_source = "--total-batch-size"
    if total_batch_size is None:
        total_batch_size = 2 ** round(math.log2(B_REF * (target_tokens / reference_tokens) ** BATCH_EXPONENT))
        batch_source = f"auto: 2^round(log2({B_REF} x (D/D_ref)^{BATCH_EXPONENT}))"
    seq_len = flags["max_seq_len"]
    flops_per_token = model.flops_per_token(seq_len)
    if flags["num_iterations"] is not None:
        num_iterations, horizon = flags["num_iterations"], "--num-iterations"
    elif flags["target_flops"] is not None:
        num_iterations = round(flags["target_flops"] / (flops_per_token * total_batch_size))
        horizon = "--target-flops"
    else:
        num_iterations, horizon = int(target_tokens // total_batch_size), "--target-param-data-ratio"
    if num_iterations < 1:
        raise PicochatError(f"the horizon ({horizon}) gives {num_iterations} steps of {total_batch_size:,} tokens; "
                            "raise it or lower --total-batch-size")  # fmt: skip
    batch_scale = flags["batch_lr_scale"] or math.sqrt(total_batch_size / B_REF)
    weight_decay = flags["muon_weight_decay"]
    if weight_decay is None:
        weight_decay = flags["weight_decay"] * math.sqrt(total_batch_size / B_REF) * reference_tokens / target_tokens
    accumulation = gradient_accumulation_steps(total_batch_size, flags["device_batch_size"], seq_len, world_size)
    counts = model.parameter_counts()
    tokens = num_iterations * total_batch_size
    return {
        "model_config": model.config.to_dict(),
        "window_sizes": model.window_sizes,
        "parameters": counts,
        "scaling_params": scaling_params,
        "flops_per_token": flops_per_token,
        "target_tokens": int(target_tokens),
        "reference_tokens": int(reference_tokens),
        "total_batch_size": total_batch_size,
        "batch_source": batch_source,
        "num_iterations": num_iterations,
        "horizon_source": horizon,
        "training_tokens": tokens,
        "training_flops": float(flops_per_token * tokens),
        "tokens_per_scaling_param": tokens / scaling_params,
        "world_size": world_size,
        "gradient_accumulation": accumulation,
        "batch_lr_scale": batch_scale,
        "embedding_lr": flags["embedding_lr"] * batch_scale,
        "unembedding_lr": flags["unembedding_lr"] * batch_scale,
        "matrix_lr": flags["matrix_lr"] * batch_scale,
        "scalar_lr": flags["scalar_lr"] * batch_scale,
        "weight_decay": weight_decay,
    }


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

    from picochat.checkpoint import load_checkpoint, resume_point
    from picochat.common import compute_dtype
    from picochat.data import TextFormat, default_pretraining_files, find_text_files, split_train_val
    from picochat.gpt import GPT, GPTConfig
    from picochat.hardware import distributed_session
    from picochat.packing import pretraining_batches
    from picochat.tokenizer import Tokenizer, split_pattern_name
    from picochat.trainer import Trainer, TrainSettings

    run_dir = resolve_run_dir(args.run, args.run_dir)
    stage_dir = run_dir / "base"
    resume_from = resume_point(stage_dir, args.resume, holds="a pretraining run")
    saved_config = None if resume_from is None else _read_json(stage_dir / "config.json").get("flags")
    flags = resolve_flags(args, saved_config)
    if flags["architecture"] == "portable" and args.window_pattern and "S" in args.window_pattern:
        raise PicochatError(f"--window-pattern {args.window_pattern}: the portable architecture has no sliding windows")
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
    if flags["architecture"] == "portable" and split_pattern_name(tokenizer.pattern) != "llama-bpe":
        warn(f"{tokenizer_dir}: this tokenizer does not split text as llama.cpp's llama-bpe does, so the portable "
             "model will export to Hugging Face but not to GGUF (train the tokenizer with --split-pattern llama-bpe)")
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
        settings = TrainSettings(
            total_batch_size=plan["total_batch_size"], device_batch_size=flags["device_batch_size"],
            seq_len=flags["max_seq_len"], num_iterations=plan["num_iterations"],
            warmup_steps=flags["warmup_steps"], warmdown_ratio=flags["warmdown_ratio"],
            final_lr_frac=flags["final_lr_frac"], eval_every=flags["eval_every"], eval_tokens=flags["eval_tokens"],
            sample_every=flags["sample_every"], save_every=flags["save_every"],
            keep_checkpoints=flags["keep_checkpoints"], compile=use_compile, wandb_run=args.wandb_run,
        )  # fmt: skip

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
            "provenance": _provenance(device, compute_dtype(device), ranks.world_size, use_compile, resume_from),
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


def _provenance(device, dtype, world_size, use_compile, resume_from) -> dict[str, Any]:
    import torch

    from picochat import __version__

    commit = None
    try:
        result = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=5)  # fmt: skip
        if result.returncode == 0:
            commit = result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "picochat_version": __version__,
        "git_commit": commit,
        "torch_version": torch.__version__,
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "world_size": world_size,
        "compile": use_compile,
        "resumed_from_step": resume_from,
    }


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PicochatError(f"{path}: cannot read the run's configuration ({error})") from None
    if not isinstance(value, dict):
        raise PicochatError(f"{path}: expected a JSON object")
    return value
