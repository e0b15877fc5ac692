"""`picochat rl`: reinforcement learning on GSM8K (picochat/rl.py has the algorithm; REFERENCE A.17).

    picochat rl --run d12                                   # <run>/sft -> <run>/rl, the reference's settings
    picochat rl --run d12 --examples-per-step 2 --num-samples 4 --max-new-tokens 64 --num-steps 5   # CPU-sized
    picochat rl --run d12 --resume                          # continue exactly (weights, optimizer, RNG, data)

The loop is picochat/rl_trainer.py, on the machinery every training stage shares (picochat/stage_loop.py):
Ctrl-C or SIGTERM finishes the step, saves and exits; checkpoints (every --save-every steps, at the end, and when
stopped) hold the weights, the full optimizer state, the RNG state and the step -- the data position follows from
the step -- so a resume continues exactly. A resume keeps the run's flags unless given again, and refuses another
--source, --examples-per-step or --num-samples.
Writes <run>/rl/: config.json ({"model": ..., provenance}), metrics.jsonl (mean reward, loss, pass@k), state/.
"""

from __future__ import annotations

import argparse
import os

from picochat.common import (
    PicochatError,
    add_training_arguments,
    atomic_write_json,
    log,
    resolve_run_dir,
    typable_command,
)
from picochat.settings import RLSettings, add_flags, as_flags, fixed_names, resolve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser)
    add_flags(parser, RLSettings)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from picochat.checkpoint import (
        load_checkpoint,
        load_weights,
        model_shape,
        provenance,
        read_stage_config,
        resume_point,
    )
    from picochat.gpt import GPT, GPTConfig
    from picochat.hardware import distributed_session
    from picochat.rl_trainer import RLTrainer
    from picochat.tasks import GSM8K
    from picochat.tokenizer import Tokenizer

    run_dir = resolve_run_dir(args.run, args.run_dir)
    stage_dir = run_dir / "rl"
    resume_from = resume_point(stage_dir, args.resume, holds="an RL run")
    opts = resolve(RLSettings, args, read_stage_config(stage_dir).get("flags") if resume_from is not None else None)
    source_dir = run_dir / opts.source
    if not (source_dir / "model.safetensors").is_file():
        raise PicochatError(f"{source_dir}: no trained model (model.safetensors missing); run `picochat sft` first")
    model_config = model_shape(read_stage_config(source_dir))
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    train_task, test_task = GSM8K("train", data_dir=args.data_dir), GSM8K("test", data_dir=args.data_dir)
    num_steps = opts.num_steps or len(train_task) // opts.examples_per_step * opts.num_epochs
    if num_steps < 1:
        raise PicochatError(f"--examples-per-step {opts.examples_per_step} exceeds the {len(train_task)} questions")

    with distributed_session(args.device) as ranks:
        device = ranks.device
        if opts.examples_per_step % ranks.world_size:
            raise PicochatError(f"--examples-per-step {opts.examples_per_step} must be a multiple of the "
                                f"{ranks.world_size} ranks")  # fmt: skip
        model = GPT.build(GPTConfig.from_dict(model_config), device)
        model.load_state_dict(load_weights(source_dir))
        optimizer = model.setup_optimizer(
            unembedding_lr=opts.unembedding_lr, embedding_lr=opts.embedding_lr, matrix_lr=opts.matrix_lr,
            scalar_lr=opts.scalar_lr, weight_decay=opts.weight_decay,
        )  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * opts.init_lr_frac
            group["initial_lr"] = group["lr"]
        location = f"--run-dir {run_dir}" if args.run_dir else f"--run {args.run or 'default'}"
        trainer = RLTrainer(
            model,
            optimizer,
            tokenizer,
            train_task,
            test_task,
            opts,
            num_steps,
            fixed=fixed_names(RLSettings),
            stage_dir=stage_dir,
            ranks=ranks,
            resume_hint=f"{typable_command()} rl --resume {location}",
        )
        if resume_from is not None:
            trainer.restore(load_checkpoint(stage_dir, resume_from))
        if ranks.is_main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(
                stage_dir / "config.json",
                {
                    "stage": "rl",
                    "model": model_config,
                    "source": {"stage": opts.source, "path": str(source_dir)},
                    "flags": as_flags(opts),
                    "settings": {**as_flags(opts), "num_steps": num_steps},
                    "provenance": provenance(device, torch.float32, ranks.world_size, False, resume_from),
                },
            )
        step = trainer.run()
        if step >= num_steps:
            log(f"rl done at step {step:,}; weights in {stage_dir / 'model.safetensors'}")
    return 0
