"""`picochat sft`: supervised fine-tuning of a run's model on a mixture of chat tasks (and `--stage mid`: midtraining).

    picochat sft --run d12                                          # <run>/mid (if any, else base) -> <run>/sft
    picochat sft --run d12 --mix alpaca:1,gsm8k:4,identity:2,my.jsonl:3 --identity-name Pico
    picochat sft --run d12 --stage mid                              # base -> <run>/mid on a large general mixture
    picochat sft --run d12 --resume                                 # continue exactly where it stopped

What it does (REFERENCE A.16, with the reference's packing bug A.25 #1 fixed in picochat.packing):
  - the model starts from the source stage's weights; seq len, batch sizes and learning rates are inherited from
    the source run's config.json unless given (what was inherited is printed);
  - conversations are rendered with the loss mask (only assistant tokens carry a loss) and best-fit packed whole
    into rows padded with BOS (packing.sft_batches: never cropped across rows, never an all-masked row);
  - one pass over the mixture (or --num-iterations steps). The schedule runs over *progress*: the exact number
    of steps of one epoch is counted before training (a dry pass of the packer), so the LR warmdown ends where
    the data ends. LRs x --init-lr-frac (0.8), no warmup, linear warmdown over the last 50% to 0, Muon momentum
    0.85 -> 0.95 over 300 steps, no weight decay;
  - a held-out slice of the mixture (--val-conversations) gives the validation bpb; greedy chat replies to a few
    prompts are logged every --sample-every steps (the optional in-training chat evaluation);
  - the shared trainer (picochat.trainer) does the rest: exact resume, SIGINT save, metrics.jsonl, checkpoints.
Writes <run>/sft/ (or <run>/mid/): config.json ({"model": ..., "source": ..., provenance}), metrics.jsonl, state/.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from picochat.common import (
    PicochatError,
    add_training_arguments,
    atomic_write_json,
    log,
    print_table,
    resolve_run_dir,
    typable_command,
)
from picochat.settings import SFTSettings, add_flags, as_flags, inherited_names, resolve, train_settings

# The midtraining mixture: every built-in source once: conversations, multiple choice, math with tool calls,
# identity and spelling -- everything the chat format has (special tokens, tool calls, letters as answers).
DEFAULT_MID_MIX = "alpaca:1,code_alpaca:1,gpteacher_roleplay:1,glaive_toolcall:1,identity:1,gsm8k:1,arc:1,spelling:1"
CHAT_SAMPLE_PROMPTS = ["What is your name?", "Who made you?", "What is 12 times 7?", "Write a haiku about the sea."]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser)
    parser.add_argument(
        "--stage",
        choices=("sft", "mid"),
        default="sft",
        help="sft (default): <run>/mid or base -> <run>/sft; mid: midtraining, base -> <run>/mid",
    )
    add_flags(
        parser,
        SFTSettings,
        {
            "data": parser.add_argument_group("data"),
            "shape": parser.add_argument_group("shapes and learning rates (default: inherited from the source run)"),
            "cadence": parser.add_argument_group("evaluation and checkpoints"),
        },
    )


# ----------------------------------------------------------------------------------------------------------
# Pieces (pure, tested)


def source_stage_dir(run_dir: Path, stage: str, source: str | None) -> Path:
    """Where the starting weights come from: --source, else mid (if trained) then base; midtraining uses base."""
    if source is None:
        source = "base" if stage == "mid" or not (run_dir / "mid" / "model.safetensors").is_file() else "mid"
    if source == stage:
        raise PicochatError(f"--source {source}: a stage cannot start from itself")
    folder = run_dir / source
    if not (folder / "model.safetensors").is_file():
        hint = "picochat pretrain" if source == "base" else "picochat sft --stage mid"
        raise PicochatError(f"{folder}: no trained model (model.safetensors missing); run `{hint}` first")
    return folder


def inherited_settings(args: argparse.Namespace, source_config: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    """Shapes and LRs: the flag if given, else the source run's value. Pretraining records its flags under "flags"
    and the LRs it really used (after its batch-size scaling) under "derived"; SFT/mid record "settings"."""
    flags = source_config.get("flags") or {}
    derived = source_config.get("derived") or {}
    earlier = source_config.get("settings") or {}
    values, rows = {}, []
    for name in inherited_names(SFTSettings):
        given = getattr(args, name, None)
        found = earlier.get(name, derived.get(name, flags.get(name)))
        if given is not None:
            values[name], origin = given, "flag"
        elif found is not None:
            values[name], origin = found, "inherited"
        else:
            raise PicochatError(f"the source run's config.json has no {name}; give --{name.replace('_', '-')}")
        rows.append({"setting": name, "value": values[name], "from": origin})
    return values, rows


def split_mixture(mixture, val_conversations: int | None):
    """(train, val) views of the shuffled mixture: the last conversations are held out for validation."""
    from picochat.tasks import take

    size = len(mixture)
    held_out = min(500, size // 20) if val_conversations is None else val_conversations
    if held_out >= size:
        raise PicochatError(f"--val-conversations {held_out}: the mixture has only {size} conversations")
    train = take(mixture, 0, size - held_out)
    val = take(mixture, size - held_out) if held_out > 0 else None
    return train, val


def count_epoch_steps(conversations, tokenizer, *, rows_per_step: int, seq_len: int) -> tuple[int, dict[str, int]]:
    """Optimizer steps of one pass over `conversations` with the trainer's layout (one row from each of the
    rows_per_step streams per step), by running the packer once; and its packing counters. Ranks and micro-steps
    do not change the rows, so this number holds for any split."""
    from picochat.packing import sft_batches

    steps, state = 0, None
    for _, _, batch_state in sft_batches(conversations, tokenizer, rows_per_step, seq_len, loop=False,
                                         num_streams=rows_per_step):  # fmt: skip
        steps, state = steps + 1, batch_state
    stats = (state or {}).get("stats", {})
    return steps, {key: value for key, value in stats.items() if isinstance(value, int)}


# ----------------------------------------------------------------------------------------------------------
# The stage


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see stages/pretrain.py
    import torch

    from picochat.checkpoint import (
        load_checkpoint,
        load_weights,
        model_shape,
        provenance,
        read_stage_config,
        resume_point,
    )
    from picochat.engine import Engine
    from picochat.evaluation.chat import parse_task_names, run_chat_eval
    from picochat.gpt import GPT, GPTConfig
    from picochat.hardware import distributed_session
    from picochat.packing import sft_batches
    from picochat.tasks import DEFAULT_SFT_MIX, build_mixture
    from picochat.tokenizer import Tokenizer
    from picochat.trainer import Trainer

    run_dir = resolve_run_dir(args.run, args.run_dir)
    stage_dir = run_dir / args.stage
    resume_from = resume_point(stage_dir, args.resume, holds="a run")
    saved = read_stage_config(stage_dir) if resume_from is not None else {}
    # Command line > this run's config.json (on --resume) > declared default; shapes and LRs not settled yet come
    # from the source run (inherited_settings). The schedule's length is the one the run settled on.
    settings = resolve(SFTSettings, args, saved.get("flags") if resume_from is not None else None)
    if settings.num_iterations is None and saved.get("settings", {}).get("num_iterations"):
        settings = replace(settings, num_iterations=saved["settings"]["num_iterations"])
    source_dir = source_stage_dir(run_dir, args.stage, settings.source)
    source_config = read_stage_config(source_dir)
    model_config = model_shape(source_config)
    settings_values, inherited_rows = inherited_settings(settings, source_config)
    seq_len = settings_values["max_seq_len"]
    if seq_len > model_config["sequence_len"]:
        raise PicochatError(f"--max-seq-len {seq_len} is longer than the model's context "
                            f"({model_config['sequence_len']} tokens, from {source_dir})")  # fmt: skip
    tokenizer_dir = run_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise PicochatError(f"no tokenizer in {tokenizer_dir}")
    tokenizer = Tokenizer.load(tokenizer_dir)
    tokenizer_sha256 = hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()

    spec = settings.mix or (DEFAULT_MID_MIX if args.stage == "mid" else DEFAULT_SFT_MIX)
    settings = replace(settings, source=source_dir.name, mix=spec, **settings_values)
    flags = {"stage": args.stage, **as_flags(settings)}
    mixture = build_mixture(
        spec,
        data_dir=args.data_dir,
        seed=settings.seed,
        identity_name=settings.identity_name,
        identity_creator=settings.identity_creator,
        identity_file=settings.identity_file,
    )
    train_set, val_set = split_mixture(mixture, settings.val_conversations)
    for line in print_table(mixture.summary()).splitlines():
        log(line)
    for line in print_table(inherited_rows).splitlines():
        log(line)

    with distributed_session(args.device) as ranks:
        device = ranks.device
        rows_per_step = settings_values["total_batch_size"] // seq_len
        if rows_per_step * seq_len != settings_values["total_batch_size"]:
            raise PicochatError(f"--total-batch-size {settings_values['total_batch_size']} is not a multiple of "
                                f"--max-seq-len {seq_len}")  # fmt: skip
        epoch_steps, packing = count_epoch_steps(train_set, tokenizer, rows_per_step=rows_per_step, seq_len=seq_len)
        num_iterations = settings.num_iterations or epoch_steps
        if num_iterations < 1:
            raise PicochatError("the mixture fills less than one step; add data or lower --total-batch-size")
        log(f"one epoch of {len(train_set):,} conversations = {epoch_steps:,} steps of {rows_per_step} rows "
            f"({packing.get('documents_truncated', 0):,} truncated to a row, {packing.get('documents_dropped', 0):,}"
            f" dropped without a supervised token); training {num_iterations:,} steps")  # fmt: skip

        # Validation covers the held-out set once at most: eval_tokens is capped at its size in whole steps. The
        # loader loops, so that every evaluation has at least one step even when a stream of a tiny set is empty.
        eval_tokens = settings.eval_tokens
        if val_set is not None:
            val_steps, _ = count_epoch_steps(val_set, tokenizer, rows_per_step=rows_per_step, seq_len=seq_len)
            eval_tokens = min(eval_tokens, max(val_steps, 1) * settings_values["total_batch_size"])

        model = GPT.build(GPTConfig.from_dict(model_config, source=str(source_dir / "config.json")), device)
        model.load_state_dict(load_weights(source_dir))
        model.train()
        optimizer = model.setup_optimizer(
            unembedding_lr=settings_values["unembedding_lr"], embedding_lr=settings_values["embedding_lr"],
            matrix_lr=settings_values["matrix_lr"], scalar_lr=settings_values["scalar_lr"], weight_decay=0.0,
        )  # fmt: skip
        for group in optimizer.param_groups:  # fine-tuning starts below the pretraining LRs (A.16)
            group["lr"] = group["lr"] * settings.init_lr_frac
            group["initial_lr"] = group["lr"]
        trainer_settings = train_settings(
            flags,
            total_batch_size=settings_values["total_batch_size"],
            seq_len=seq_len,
            num_iterations=num_iterations,
            warmup_steps=0,
            momentum_start=0.85,
            momentum_peak=0.95,
            momentum_warmup_steps=300,
            momentum_final=0.95,
            cosine_weight_decay=False,
            eval_tokens=eval_tokens,
            sample_every=settings.sample_every or num_iterations,
        )

        def train_loader(**layout):
            return sft_batches(train_set, tokenizer, device=device, loop=False, **layout)

        def val_loader(**layout):
            return sft_batches(val_set, tokenizer, device=device, loop=True, **layout)

        chat_tasks = parse_task_names(settings.chat_eval_tasks) if settings.chat_eval_tasks else []

        def chat_samples(trained) -> list[tuple[str, str]]:
            """Greedy replies to a few prompts, and the optional chat evaluation (rank 0 alone: the trainer calls
            this on rank 0 only, so nothing here talks to the other ranks)."""
            if chat_tasks:
                result = run_chat_eval(trained, tokenizer, chat_tasks, data_dir=args.data_dir,
                                       max_problems=settings.chat_eval_max_problems, max_new_tokens=256)  # fmt: skip
                atomic_write_json(stage_dir / "chat_eval" / f"step_{trainer.step:06d}.json",
                                  {"step": trainer.step, **result})  # fmt: skip
                scores = ", ".join(f"{name} {r['accuracy']:.3f}" for name, r in result["tasks"].items())
                log(f"step {trainer.step:,}: chat evaluation: {scores}")
            engine = Engine(trained, tokenizer)
            samples = []
            for prompt in CHAT_SAMPLE_PROMPTS:
                ids = tokenizer.render_for_completion([{"role": "user", "content": prompt}])
                room = min(64, engine.context_len - len(ids))
                if room < 1:
                    samples.append((prompt, "(the prompt does not fit the model's context)"))
                    continue
                reply = engine.generate_batch(ids, max_tokens=room, temperature=0.0)[0]
                samples.append((prompt, tokenizer.decode(reply.tokens)))
            trained.train()
            return samples

        location = f"--run-dir {run_dir}" if args.run_dir else f"--run {args.run or 'default'}"
        config = {
            "stage": args.stage,
            "model": model_config,
            "source": {"stage": source_dir.name, "path": str(source_dir)},
            "flags": flags,
            "settings": {**settings_values, "num_iterations": num_iterations, "epoch_steps": epoch_steps},
            "inherited": {row["setting"]: row["from"] for row in inherited_rows},
            "mixture": mixture.summary(),
            "data": {"train_conversations": len(train_set), "val_conversations": len(val_set or []),
                     "packing": packing},
            "tokenizer": {"path": str(tokenizer_dir), "sha256": tokenizer_sha256, "vocab_size": tokenizer.vocab_size},
            "provenance": provenance(device, torch.float32, ranks.world_size, False, resume_from),
        }  # fmt: skip
        trainer = Trainer(
            model, optimizer, trainer_settings, stage_dir=stage_dir, ranks=ranks, make_train_loader=train_loader,
            make_val_loader=val_loader if val_set is not None else None, token_bytes=tokenizer.token_bytes(),
            sample=chat_samples,
            resume_settings={"model_config": model_config, "tokenizer_sha256": tokenizer_sha256, "mix": spec,
                             "train_conversations": len(train_set)},
            resume_hint=f"{typable_command()} sft --stage {args.stage} --resume {location}", wandb_config=config,
        )  # fmt: skip
        if resume_from is not None:
            trainer.restore(load_checkpoint(stage_dir, resume_from))
        if ranks.is_main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(stage_dir / "config.json", config)
        start = time.perf_counter()
        step = trainer.run()
        best = "n/a" if math.isinf(trainer.min_val_bpb) else f"{trainer.min_val_bpb:.4f}"
        log(f"{args.stage} done: {step:,} steps in {(time.perf_counter() - start) / 60:.1f} min, best validation "
            f"bpb {best}; weights in {stage_dir / 'model.safetensors'}")  # fmt: skip
    return 0
