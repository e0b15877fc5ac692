"""`picochat rl`: reinforcement learning on GSM8K (picochat/rl.py has the algorithm; REFERENCE A.17).

    picochat rl --run d12                                   # <run>/sft -> <run>/rl, the reference's settings
    picochat rl --run d12 --examples-per-step 2 --num-samples 4 --max-new-tokens 64 --num-steps 5   # CPU-sized
    picochat rl --run d12 --resume                          # continue exactly (weights, optimizer, RNG, data)

Step s (0-based) trains on questions s x E .. s x E + E - 1 of the training set (E = --examples-per-step over
all ranks; rank r takes every world_size-th of them), each sampled --num-samples times through the Engine with the
calculator tool. One optimizer step per RL step; LR x --init-lr-frac x (1 - s / num_steps). Every --eval-every
steps: pass@k (k = 1..--eval-samples) on --eval-examples test questions at temperature 1. Checkpoints (every
--save-every steps and at the end) hold the weights, the full optimizer state, the RNG state and the step -- the
data position follows from the step -- so a resume continues exactly.
Writes <run>/rl/: config.json ({"model": ..., provenance}), metrics.jsonl (mean reward, loss, pass@k), state/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from picochat.common import (
    PicochatError,
    add_run_arguments,
    atomic_write_json,
    atomic_write_text,
    log,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_run_dir,
    resume_step,
)

RESUME_FIXED = ("examples_per_step", "num_samples", "source")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--data-dir", help="data folder (default: $PICOCHAT_DATA_DIR or $PICOCHAT_HOME/data)")
    parser.add_argument("--source", choices=("sft", "mid", "base"), default="sft", help="stage to start from (sft)")
    parser.add_argument("--resume", nargs="?", const="latest", type=resume_step, metavar="STEP",
                        help="continue from the latest checkpoint (or from STEP), exactly")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    parser.add_argument("--num-epochs", type=positive_int, default=1, help="passes over GSM8K train (1)")
    parser.add_argument("--num-steps", type=positive_int,
                        help="RL steps (default: train questions / examples per step)")
    parser.add_argument("--examples-per-step", type=positive_int, default=16, help="questions per step, all ranks (16)")
    parser.add_argument("--num-samples", type=positive_int, default=16, help="samples per question (16)")
    parser.add_argument("--device-batch-size", type=positive_int, default=8, help="samples per forward pass (8)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens per sample (256)")
    parser.add_argument("--temperature", type=non_negative_float, default=1.0, help="sampling temperature (1.0)")
    parser.add_argument("--top-k", type=non_negative_int, default=50, help="top-k sampling, 0 = off (50)")
    parser.add_argument("--embedding-lr", type=positive_float, default=0.2, help="AdamW, embeddings (0.2)")
    parser.add_argument("--unembedding-lr", type=positive_float, default=0.004, help="AdamW, lm_head (0.004)")
    parser.add_argument("--matrix-lr", type=positive_float, default=0.02, help="Muon, block matrices (0.02)")
    parser.add_argument("--scalar-lr", type=positive_float, default=0.5, help="AdamW, per-layer scalars (0.5)")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="Muon weight decay (0.0)")
    parser.add_argument("--init-lr-frac", type=positive_float, default=0.05, help="all LRs x this (0.05)")
    parser.add_argument("--eval-every", type=non_negative_int, default=60,
                        help="pass@k every N steps; 0: at the end (60)")
    parser.add_argument("--eval-examples", type=positive_int, default=400, help="test questions for pass@k (400)")
    parser.add_argument("--eval-samples", type=positive_int, default=8, help="samples per test question: k = 1..N (8)")
    parser.add_argument("--save-every", type=non_negative_int, default=60,
                        help="checkpoint every N steps; 0: at the end (60)")
    parser.add_argument("--keep-checkpoints", type=positive_int, default=2, help="checkpoints kept on disk (2)")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import torch.distributed as dist

    from picochat.checkpoint import (
        load_checkpoint,
        load_weights,
        model_shape,
        provenance,
        read_stage_config,
        resume_point,
        save_checkpoint,
    )
    from picochat.engine import Engine
    from picochat.gpt import GPT, GPTConfig
    from picochat.hardware import distributed_session
    from picochat.rl import pass_at_k, policy_gradient_loss, rollout_tensors, sample_rollout
    from picochat.tasks import GSM8K
    from picochat.tokenizer import Tokenizer

    run_dir = resolve_run_dir(args.run, args.run_dir)
    stage_dir = run_dir / "rl"
    resume_from = resume_point(stage_dir, args.resume, holds="an RL run")
    source_dir = run_dir / args.source
    if not (source_dir / "model.safetensors").is_file():
        raise PicochatError(f"{source_dir}: no trained model (model.safetensors missing); run `picochat sft` first")
    model_config = model_shape(read_stage_config(source_dir))
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    train_task, test_task = GSM8K("train", data_dir=args.data_dir), GSM8K("test", data_dir=args.data_dir)
    num_steps = args.num_steps or len(train_task) // args.examples_per_step * args.num_epochs
    if num_steps < 1:
        raise PicochatError(f"--examples-per-step {args.examples_per_step} exceeds the {len(train_task)} questions")
    top_k = args.top_k or None
    settings = {name: getattr(args, name) for name in (
        "source", "examples_per_step", "num_samples", "device_batch_size", "max_new_tokens", "temperature", "top_k",
        "embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "weight_decay", "init_lr_frac", "eval_every",
        "eval_examples", "eval_samples", "save_every")}  # fmt: skip
    settings["num_steps"] = num_steps

    with distributed_session(args.device) as ranks:
        device = ranks.device
        if args.examples_per_step % ranks.world_size:
            raise PicochatError(f"--examples-per-step {args.examples_per_step} must be a multiple of the "
                                f"{ranks.world_size} ranks")  # fmt: skip
        distributed = ranks.world_size > 1 and dist.is_initialized()
        model = GPT.build(GPTConfig.from_dict(model_config), device)
        model.load_state_dict(load_weights(source_dir))
        optimizer = model.setup_optimizer(
            unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr, matrix_lr=args.matrix_lr,
            scalar_lr=args.scalar_lr, weight_decay=args.weight_decay,
        )  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * args.init_lr_frac
            group["initial_lr"] = group["lr"]
        step = 0
        if resume_from is not None:
            checkpoint = load_checkpoint(stage_dir, resume_from)
            saved = checkpoint.training_state.get("settings", {})
            for name in RESUME_FIXED:
                if saved.get(name) != settings[name]:
                    raise PicochatError(f"{checkpoint.path}: cannot resume, it was trained with {name}="
                                        f"{saved.get(name)!r} and this run has {settings[name]!r}")  # fmt: skip
            model.load_state_dict(checkpoint.model_state)
            optimizer.load_state_dict(checkpoint.training_state["optimizer"])
            torch.set_rng_state(checkpoint.training_state["rng"]["torch_cpu"])
            step = checkpoint.step
            log(f"resumed from {checkpoint.path} at step {step:,}")
        engine = Engine(model, tokenizer)
        stop_token = tokenizer.encode_special("<|assistant_end|>")
        metrics_file = _open_metrics(stage_dir, step) if ranks.is_main else None

        def write(event: dict[str, Any]) -> None:
            if metrics_file is not None:
                metrics_file.write(json.dumps(event) + "\n")
                metrics_file.flush()

        def all_sum(values: list[float]) -> list[float]:
            tensor = torch.tensor(values, dtype=torch.float64, device=device)
            if distributed:
                dist.all_reduce(tensor)
            return tensor.tolist()

        def evaluate() -> dict[str, float]:
            """pass@k on the first eval_examples test questions (ranks stride), at the training temperature."""
            correct = []
            for index in range(ranks.rank, min(args.eval_examples, len(test_task)), ranks.world_size):
                rollout = sample_rollout(engine, test_task, index, num_samples=args.eval_samples,
                                         max_new_tokens=args.max_new_tokens, temperature=1.0, top_k=top_k,
                                         device_batch_size=args.device_batch_size, seed_parts=(-1, index))  # fmt: skip
                correct.append([reward > 0 for reward in rollout.rewards])
            counts = all_sum([len(correct)] + [pass_at_k(correct, k) * len(correct)
                                               for k in range(1, args.eval_samples + 1)])  # fmt: skip
            return {f"pass@{k}": counts[k] / max(counts[0], 1) for k in range(1, args.eval_samples + 1)}

        def save() -> None:
            optimizer_state = optimizer.state_dict()  # collective
            if not ranks.is_main:
                return
            training_state = {"optimizer": optimizer_state, "rng": {"torch_cpu": torch.get_rng_state()},
                              "settings": settings}  # fmt: skip
            folder = save_checkpoint(stage_dir, step, model.state_dict(), training_state, keep=args.keep_checkpoints)
            write({"event": "checkpoint", "step": step, "path": str(folder)})

        if ranks.is_main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(stage_dir / "config.json", {
                "stage": "rl", "model": model_config, "source": {"stage": args.source, "path": str(source_dir)},
                "settings": settings, "provenance": provenance(device, torch.float32, ranks.world_size, False,
                                                                resume_from)})  # fmt: skip
        examples_per_rank = args.examples_per_step // ranks.world_size
        passes = math.ceil(args.num_samples / args.device_batch_size)
        first_step = step
        try:
            while True:
                if args.eval_every and step % args.eval_every == 0 or step == num_steps:
                    scores = evaluate()
                    write({"event": "eval", "step": step, **scores})
                    log(f"step {step:,}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
                if step > first_step and (step == num_steps or args.save_every and step % args.save_every == 0):
                    save()
                if step == num_steps:
                    break
                start = time.perf_counter()
                lr_multiplier = 1.0 - step / num_steps
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * lr_multiplier
                rewards, loss_total, sampled_tokens = [], 0.0, 0
                for local in range(examples_per_rank):
                    position = step * args.examples_per_step + local * ranks.world_size + ranks.rank
                    index = position % len(train_task)
                    model.eval()
                    rollout = sample_rollout(engine, train_task, index, num_samples=args.num_samples,
                                             max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                             top_k=top_k, device_batch_size=args.device_batch_size,
                                             seed_parts=(step, position))  # fmt: skip
                    rewards += rollout.rewards
                    model.train()
                    inputs, targets, advantages = rollout_tensors(rollout, stop_token, stop_token, device)
                    for begin in range(0, len(inputs), args.device_batch_size):
                        rows = slice(begin, begin + args.device_batch_size)
                        valid = max(int((targets[rows] != -1).sum()), 1)
                        loss, count = policy_gradient_loss(model, inputs[rows], targets[rows], advantages[rows],
                                                           valid * passes * examples_per_rank)  # fmt: skip
                        loss.backward()
                        loss_total += float(loss.detach())
                        sampled_tokens += count
                optimizer.step()
                model.zero_grad(set_to_none=True)
                engine.sync_weights()
                reward_sum, reward_count, loss_sum, tokens = all_sum([sum(rewards), len(rewards), loss_total,
                                                                      sampled_tokens])  # fmt: skip
                step += 1
                event = {"event": "train", "step": step, "mean_reward": reward_sum / max(reward_count, 1),
                         "loss": loss_sum / ranks.world_size, "sampled_tokens": int(tokens),
                         "lr_multiplier": lr_multiplier, "step_seconds": round(time.perf_counter() - start, 3)}
                write(event)
                log(f"step {step:,}/{num_steps:,}: mean reward {event['mean_reward']:.3f}, "
                    f"loss {event['loss']:.4f}, {event['step_seconds']:.1f}s")  # fmt: skip
        finally:
            if metrics_file is not None:
                metrics_file.close()
        log(f"rl done at step {step:,}; weights in {stage_dir / 'model.safetensors'}")
    return 0


def _open_metrics(stage_dir: Path, step: int):
    """metrics.jsonl: on resume, events after the resumed step are dropped (they belong to the interrupted run)."""
    path = stage_dir / "metrics.jsonl"
    kept = []
    if step > 0 and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
                if event.get("step", 0) < step or (event.get("step") == step and event.get("event") != "eval"):
                    kept.append(line)  # the eval at the resumed step runs again
            except ValueError:
                continue
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by the caller)

