"""`picochat eval core|bpb`: evaluate a trained model of a run; every result is also written to <run>/eval/.

core: the DCLM CORE score (picochat/evaluation/core.py describes the protocol). The table says how many of the 22
      tasks it covers ("CORE-18" with the shared data). Writes eval/core_<stage>_<step>.json and .csv.
bpb:  bits per byte (picochat/evaluation/bpb.py) on the stage's own train and validation files (its config.json;
      else the data folder's parquet shards, split by file as pretraining does) or on files you name. Writes
      eval/bpb_<stage>_<step>.json (named files: eval/bpb_<stage>_<step>_<first file>.json).
chat: chat evaluations of a chat model (picochat/evaluation/chat.py): ARC-Easy, ARC-Challenge, MMLU (allowed
      letters), GSM8K, HumanEval, spelling (pass@k with the engine) and ChatCORE. Writes eval/chat_<stage>_<step>.json.

All run under torchrun (gloo on CPU, NCCL on GPUs): the ranks split the work and add up their counts, so the
numbers do not depend on the number of ranks. On a CPU, one single-threaded rank per core
(`torchrun --nproc_per_node=<cores> -m picochat eval core ...`) is the fastest way, and by far the fastest when
other jobs share the machine (see bench/core.py). Every JSON written here has the same top-level shape, which
`picochat report` reads:  {"kind", "stage", "step", "metrics": {name: value}, ...details}.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

from picochat import load_for_evaluation
from picochat.common import (
    PicochatError,
    add_model_arguments,
    atomic_write_json,
    atomic_write_text,
    log,
    non_negative_int,
    positive_int,
    print_table,
    resolve_data_dir,
)
from picochat.evaluation import result_name
from picochat.hardware import is_main_process

DEFAULT_BPB_TOKENS = 2**18  # per split; a CPU evaluates ~1-5K tokens/s at depth 4 (full-vocabulary logits)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    core = actions.add_parser(
        "core",
        help="CORE score (DCLM in-context-learning tasks) of a base model",
        description="CORE: centered accuracy on the DCLM tasks, averaged; says how many of the 22 tasks it covers.",
    )
    _add_model_flags(core)
    core.add_argument("--tasks", help="comma-separated task labels (default: every task whose data exists)")
    core.add_argument(
        "--max-per-task", type=positive_int, help="items per task, the first after a fixed shuffle (default: all)"
    )
    core.add_argument("--batch-size", type=positive_int, default=8, help="items per forward pass (default 8)")
    core.add_argument(
        "--core-dir",
        help="eval bundle folder with core.yaml (default: <data-dir>/core_eval, else "
        "$PICOCHAT_HOME/eval_bundle, downloaded on first use)",
    )
    core.add_argument("--bundle-url", default=None, help="where to download the eval bundle zip from")

    bpb = actions.add_parser(
        "bpb",
        help="bits per byte on the run's train/val text or on given files",
        description="Bits per byte (tokenizer-independent loss) of a model on text files.",
    )
    _add_model_flags(bpb)
    bpb.add_argument(
        "paths",
        nargs="*",
        help="text files or folders (.parquet, .jsonl, .jsonl.gz, .txt, .txt.gz); "
        "default: the parquet shards of the data folder, as train and val splits",
    )
    bpb.add_argument(
        "--tokens",
        type=positive_int,
        default=DEFAULT_BPB_TOKENS,
        help=f"tokens to evaluate per split (default {DEFAULT_BPB_TOKENS:,})",
    )
    bpb.add_argument("--batch-size", type=positive_int, help="rows per forward pass (default 1 on CPU, 8 on GPU)")
    bpb.add_argument("--seq-len", type=positive_int, help="tokens per row (default: the model's sequence length)")
    bpb.add_argument(
        "--text-column",
        help="parquet column / jsonl field holding the text (default: the one the stage trained on, else text)",
    )

    chat = actions.add_parser(
        "chat",
        help="chat evaluations (ARC, MMLU, GSM8K, HumanEval, spelling) and ChatCORE of a chat model",
        description="Categorical tasks: the most likely allowed answer letter; generative tasks: pass@k with the "
        "engine. ChatCORE: mean centered accuracy over ARC-E, ARC-C, MMLU, GSM8K, HumanEval.",
    )
    _add_model_flags(chat)
    chat.add_argument(
        "--tasks", help="comma-separated: ARC-Easy,ARC-Challenge,MMLU,GSM8K,HumanEval,spelling (default: all)"
    )
    chat.add_argument("--max-problems", type=positive_int, help="problems per task, the first ones (default: all)")
    chat.add_argument("--num-samples", type=positive_int, default=1, help="samples per generative problem (1)")
    chat.add_argument("--temperature", type=float, default=0.0, help="sampling temperature, 0 = greedy (0.0)")
    chat.add_argument("--top-k", type=non_negative_int, default=50, help="top-k sampling, 0 = off (50)")
    chat.add_argument("--max-new-tokens", type=positive_int, default=512, help="tokens per reply (512)")
    chat.add_argument("--batch-size", type=positive_int, default=8, help="categorical prompts per forward (8)")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    parser.add_argument("--data-dir", help="data folder (default: $PICOCHAT_DATA_DIR or $PICOCHAT_HOME/data)")


def run(args: argparse.Namespace) -> int:
    from picochat.hardware import distributed_session

    with distributed_session(args.device) as ranks:
        evaluate = {"core": evaluate_core, "chat": evaluate_chat, "bpb": evaluate_bpb}[args.action]
        return evaluate(args, ranks.device, ranks.rank, ranks.world_size)


# ----------------------------------------------------------------------------------------------------------
# core


def evaluate_core(args: argparse.Namespace, device, rank: int, world_size: int) -> int:
    import torch

    from picochat.evaluation.core import core_csv
    from picochat.evaluation.core import evaluate_core as run_core
    from picochat.evaluation.core_tasks import EVAL_BUNDLE_URL, resolve_core_dir

    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()] if args.tasks else None
    url = args.bundle_url or EVAL_BUNDLE_URL
    run_dir, stage, step, model, tokenizer = load_for_evaluation(args.run, args.run_dir, args.stage, args.step, device)
    # Rank 0 fetches the bundle if it must; the other ranks wait for it, then find it in place.
    if rank == 0:
        core_dir = resolve_core_dir(args.core_dir, args.data_dir, url=url)
    if world_size > 1:
        torch.distributed.barrier()
    if rank != 0:
        core_dir = resolve_core_dir(args.core_dir, args.data_dir, url=url)
    result = run_core(
        model,
        tokenizer,
        core_dir,
        tasks=tasks,
        max_per_task=args.max_per_task,
        batch_size=args.batch_size,
        rank=rank,
        world_size=world_size,
    )
    if not is_main_process():
        return 0

    rows = [
        {
            "task": t.label,
            "shots": t.num_fewshot,
            "type": t.task_type,
            "items": t.examples,
            "accuracy": t.accuracy,
            "baseline%": t.random_baseline,
            "centered": t.centered,
        }
        for t in result.tasks
    ]
    print(print_table(rows))
    print(
        f"{result.label}: {result.core:.4f}  ({len(result.tasks)} of 22 tasks, {result.examples} items, "
        f"{result.seconds:.0f}s, {result.examples / max(result.seconds, 1e-9):.1f} items/s)"
    )
    document = {
        "kind": "core",
        "stage": stage,
        "step": step,
        "metrics": {"CORE": result.core},
        "core_dir": str(core_dir),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "world_size": world_size,
        "device": str(device),
        **result.to_dict(),
    }
    name = result_name("core", stage, step)
    atomic_write_json(run_dir / "eval" / f"{name}.json", document)
    atomic_write_text(run_dir / "eval" / f"{name}.csv", core_csv(result))
    log(f"wrote {run_dir / 'eval' / name}.json and .csv")
    print(
        json.dumps(
            {
                "metric": result.label,
                "core": result.core,
                "tasks": len(result.tasks),
                "items": result.examples,
                "seconds": round(result.seconds, 1),
            }
        )
    )
    return 0


# ----------------------------------------------------------------------------------------------------------
# bpb


def bpb_sources(paths: list[str], data_dir: str | None, stage_config: dict) -> dict[str, list[Path]]:
    """Split name -> files: the named paths as one split "text"; else the files the stage trained and validated on
    (its config.json "data": {"train_files", "val_files"}); else the data folder's parquet shards, split by file
    as pretraining splits them."""
    from picochat.data import default_pretraining_files, find_text_files, split_train_val

    if paths:
        return {"text": find_text_files(paths)}
    data = stage_config.get("data")
    if isinstance(data, dict) and (data.get("train_files") or data.get("val_files")):
        sources = {"train": data.get("train_files") or [], "val": data.get("val_files") or []}
        return {split: find_text_files(files) for split, files in sources.items() if files}
    train, val = split_train_val(default_pretraining_files(resolve_data_dir(data_dir)))
    return {split: files for split, files in (("train", train), ("val", val)) if files}


def evaluate_bpb(args: argparse.Namespace, device, rank: int, world_size: int) -> int:
    import torch

    from picochat.checkpoint import read_stage_config
    from picochat.data import TextFormat
    from picochat.evaluation.bpb import evaluate_bpb as run_bpb
    from picochat.packing import pretraining_batches

    run_dir, stage, step, model, tokenizer = load_for_evaluation(args.run, args.run_dir, args.stage, args.step, device)
    stage_config = read_stage_config(run_dir / stage)
    sources = bpb_sources(args.paths, args.data_dir, stage_config)
    flags = stage_config.get("flags") if isinstance(stage_config.get("flags"), dict) else {}
    trained_column = None if args.paths else flags.get("text_column")  # the stage's own files: its column
    text_format = TextFormat(text_column=args.text_column or trained_column or "text")
    seq_len = args.seq_len or model.config.sequence_len
    batch_size = args.batch_size or (8 if device.type == "cuda" else 1)
    tokens_per_batch = batch_size * seq_len * world_size
    num_batches = max(1, args.tokens // tokens_per_batch)
    token_bytes = tokenizer.token_bytes().to(device)
    results = {}
    for split, files in sources.items():
        started = time.perf_counter()
        loader = pretraining_batches(
            files,
            tokenizer,
            batch_size,
            seq_len,
            device=device,
            rank=rank,
            world_size=world_size,
            text_format=text_format,
            loop=False,
        )
        used = [0]

        def batches(loader=loader, used=used):
            for inputs, targets, _state in loader:
                if used[0] == num_batches:
                    return
                used[0] += 1
                yield inputs, targets

        try:
            bpb = run_bpb(model, batches(), token_bytes)
        except ValueError:  # not one full row of text
            raise PicochatError(
                f"{split}: too little text in {', '.join(map(str, files[:3]))} for one batch of "
                f"{batch_size} x {seq_len} tokens (lower --seq-len or --batch-size)"
            ) from None
        bpb = bpb if math.isfinite(bpb) else None  # no byte-carrying target at all: JSON has no infinity
        count = torch.tensor(used[0] * batch_size * seq_len, device=device)
        if world_size > 1:
            torch.distributed.all_reduce(count)
        results[split] = {
            "bpb": bpb,
            "tokens": int(count.item()),
            "files": [str(f) for f in files],
            "seconds": round(time.perf_counter() - started, 2),
        }
        log(f"{split}: {bpb} bits per byte over {int(count.item()):,} tokens")
    if not is_main_process():
        return 0

    print(
        print_table(
            [
                {
                    "split": split,
                    "bpb": r["bpb"],
                    "tokens": r["tokens"],
                    "files": len(r["files"]),
                    "seconds": r["seconds"],
                }
                for split, r in results.items()
            ]
        )
    )
    # The run's own validation text gives the headline "bpb" (the report card's row); named files only "text_bpb",
    # in a file of their own named after the first of them.
    metrics = {f"{split}_bpb": r["bpb"] for split, r in results.items()}
    name = result_name("bpb", stage, step)
    if args.paths:
        name += "_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.paths[0]).name.split(".")[0] or "text")
    elif "val" in results:
        metrics["bpb"] = results["val"]["bpb"]
    document = {
        "kind": "bpb",
        "stage": stage,
        "step": step,
        "metrics": metrics,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "tokens_requested": args.tokens,
        "splits": results,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "world_size": world_size,
        "device": str(device),
    }
    atomic_write_json(run_dir / "eval" / f"{name}.json", document)
    log(f"wrote {run_dir / 'eval' / name}.json")
    print(json.dumps({"metric": "bpb", **{split: r["bpb"] for split, r in results.items()}}))
    return 0


# ----------------------------------------------------------------------------------------------------------
# chat


def evaluate_chat(args: argparse.Namespace, device, rank: int, world_size: int) -> int:
    from picochat.evaluation.chat import parse_task_names, run_chat_eval

    if args.temperature < 0:
        raise PicochatError(f"--temperature {args.temperature}: expected a value >= 0")
    names = parse_task_names(args.tasks)
    run_dir, stage, step, model, tokenizer = load_for_evaluation(args.run, args.run_dir, args.stage, args.step, device)
    result = run_chat_eval(model, tokenizer, names, data_dir=args.data_dir, max_problems=args.max_problems,
                           num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k or None, batch_size=args.batch_size,
                           rank=rank, world_size=world_size)  # fmt: skip
    if not is_main_process():
        return 0
    rows = [{"task": name, "accuracy": round(r["accuracy"], 4), "centered": round(r["centered"], 4),
             "correct": r["correct"], "problems": r["total"]} for name, r in result["tasks"].items()]  # fmt: skip
    print(print_table(rows))
    core = result["ChatCORE"]
    missing = "n/a (needs all of ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval)"
    print(f"ChatCORE: {missing if core is None else f'{core:.4f}'}")
    metrics = {name: r["accuracy"] for name, r in result["tasks"].items()}
    metrics["ChatCORE"] = core
    document = {"kind": "chat", "stage": stage, "step": step, "metrics": metrics, **result,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    atomic_write_json(run_dir / "eval" / f"{result_name('chat', stage, step)}.json", document)
    print(json.dumps({"metric": "ChatCORE", "chatcore": core, **{k: v for k, v in metrics.items() if k != "ChatCORE"}}))
    return 0
