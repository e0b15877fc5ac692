"""Benchmark: CORE evaluation speed on this machine, ours vs the reference evaluator's way of computing it.

Model: a randomly initialised depth-4 GPT (vocab 32,768 from a tokenizer trained here on the shared Wikipedia and
Gutenberg shards, context 2,048, fp32 on CPU). Tasks: the 18 CORE tasks the shared data has.

    ours      picochat.evaluation.core: logits only at scored positions, a multiple-choice item's shared few-shot
              context run once into a KV cache, other items batched (--batch-size items per forward pass)
    baseline  the reference evaluator's computation: one item per forward pass (its choices as the batch),
              full-vocabulary logits at every position, nothing shared. Same prompts, same scoring rules.

Runs, in order:
  1. ours and the baseline in this process (--threads, default 1) on the same first --baseline-items items of every
     task: items/s of each, their ratio, and whether they agree item by item (they must: same protocol, only the
     order of the arithmetic differs);
  2. `picochat eval core --max-per-task 500` on the model saved as a run, the way a user runs it: under
     `torchrun --nproc_per_node=--ranks` (gloo, one thread per rank) when --ranks > 1. The time a full CORE-18
     takes (target: under 10 minutes here);
  3. the same command at 200 items per task for each --random-seeds seed: CORE-18 of randomly initialised models.

On a small shared CPU, ranks beat threads: with other jobs running, torch's two intra-op threads spend their time
waiting for each other (a depth-4 forward of 1,024 tokens measured 5,800 tok/s with 1 thread and 500-2,000 tok/s
with 2 at load average ~5), while two single-threaded ranks never wait.

    python bench/core.py                          # everything (~15-25 minutes on 2 shared cores)
    python bench/core.py --max-per-task 50 --baseline-items 4 --random-seeds ""   # quick

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from picochat.checkpoint import save_checkpoint
from picochat.common import atomic_write_json, log, print_table, resolve_data_dir, setup_logging
from picochat.evaluation import core, core_tasks
from picochat.evaluation.core import Row, RowScore
from picochat.gpt import GPT, GPTConfig
from picochat.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
TEN_MINUTES = 600.0


def find_data_dir(explicit: str | None) -> Path:
    """--data-dir, $PICOCHAT_DATA_DIR / $PICOCHAT_HOME/data, else the shared folder next to the repo."""
    candidate = resolve_data_dir(explicit)
    if not (candidate / "core_eval").is_dir() and not explicit:
        candidate = REPO_ROOT.parent / "shared" / "data"
    if not (candidate / "core_eval").is_dir():
        sys.exit(f"bench/core.py: no core_eval/ folder under {candidate}; pass --data-dir")
    return candidate


def train_tokenizer(data_dir: Path, vocab_size: int) -> Tokenizer:
    from picochat.data import default_pretraining_files, split_train_val
    from picochat.stages.tokenizer import training_texts

    train_files, _ = split_train_val(default_pretraining_files(data_dir / "pretrain"))
    texts = training_texts(train_files, max_chars=2_000_000_000, doc_cap=10_000)
    return Tokenizer.train(texts, vocab_size=vocab_size)


class BaselineScorer:
    """The reference evaluator's computation (see the module docstring)."""

    def __init__(self, model: GPT, pad_token_id: int):
        self.model, self.pad_token_id = model, pad_token_id

    @torch.no_grad()
    def __call__(self, items: list[list[Row]]) -> list[list[RowScore]]:
        results = []
        for rows in items:
            width = max(len(row.tokens) for row in rows)
            inputs = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
            for r, row in enumerate(rows):
                inputs[r, : len(row.tokens)] = torch.tensor(row.tokens)
            logits = self.model(inputs)  # (rows, width, vocab): every position
            scores = []
            for r, row in enumerate(rows):
                row_logits = logits[r, row.start - 1 : row.end - 1]
                targets = inputs[r, row.start : row.end]
                losses = F.cross_entropy(row_logits, targets, reduction="none")
                scores.append(RowScore(losses.mean().item(), bool((row_logits.argmax(1) == targets).all()), 0.0))
            results.append(scores)
        return results


def run_tasks(scorer, tokenizer, model, core_dir: Path, tasks, per_task: int, batch_size: int):
    """Per task: (label, items, seconds, accuracy, correct list); items chosen as `picochat eval core` chooses them."""
    results = []
    for task in tasks:
        path = core_tasks.task_data_path(core_dir, task)
        items = core_tasks.select_items(core_tasks.load_task_items(path, task.task_type), per_task)
        result = core.evaluate_task(
            scorer, tokenizer, task, items, max_tokens=model.config.sequence_len, batch_size=batch_size
        )
        log(f"{type(scorer).__name__} {task.label}: {result.examples} items in {result.seconds:.1f}s")
        results.append(result)
    return results


def eval_core_command(
    model: GPT, tokenizer: Tokenizer, core_dir: Path, max_per_task: int, ranks: int, batch_size: int
) -> tuple[dict, float]:
    """(the JSON `picochat eval core` writes, wall seconds) for `model` saved as the base stage of a run."""
    with tempfile.TemporaryDirectory(prefix="picochat_bench_core_") as folder:
        run = Path(folder) / "run"
        tokenizer.save(run / "tokenizer")
        atomic_write_json(run / "base" / "config.json", {"model": model.config.to_dict()})
        save_checkpoint(run / "base", 0, model.state_dict(), {})
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        command = [
            *(launcher if ranks > 1 else [sys.executable]),
            "-m",
            "picochat",
            "eval",
            "core",
            "--run-dir",
            str(run),
            "--core-dir",
            str(core_dir),
            "--max-per-task",
            str(max_per_task),
            "--batch-size",
            str(batch_size),
            "--device",
            "cpu",
        ]
        start = time.perf_counter()
        completed = subprocess.run(
            command, env={**os.environ, "PICOCHAT_NO_PROGRESS": "1"}, capture_output=True, text=True
        )
        seconds = time.perf_counter() - start
        if completed.returncode != 0:
            sys.exit(f"bench/core.py: {' '.join(command)} failed:\n{completed.stderr[-3000:]}")
        return json.loads((run / "eval" / "core_base_step000000.json").read_text()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=32_768)
    parser.add_argument("--window-pattern", default="SSSL", help="the model's attention windows (default SSSL)")
    parser.add_argument("--max-per-task", type=int, default=500)
    parser.add_argument("--baseline-items", type=int, default=10, help="items per task for ours vs baseline")
    parser.add_argument("--batch-size", type=int, default=8, help="items per forward pass (ours)")
    parser.add_argument(
        "--ranks",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        help="processes for the full-size runs (default: the CPU count, at most 8)",
    )
    parser.add_argument("--random-seeds", default="0,1,2,3", help="init seeds for CORE-18 at 200 items/task")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the in-process comparison (default 1: steadier on a shared machine)",
    )
    parser.add_argument("--data-dir", help="data folder holding core_eval/ and pretrain/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("PICOCHAT_NO_PROGRESS", "1")
    setup_logging()
    data_dir = find_data_dir(args.data_dir)
    core_dir = data_dir / "core_eval"
    tasks = [t for t in core_tasks.load_core_tasks(core_dir) if core_tasks.task_data_path(core_dir, t).is_file()]

    started = time.perf_counter()
    tokenizer = train_tokenizer(data_dir, args.vocab_size)
    tokenizer_seconds = time.perf_counter() - started

    def random_model(seed: int) -> GPT:
        torch.manual_seed(seed)
        config = GPTConfig.from_depth(
            args.depth, vocab_size=tokenizer.vocab_size, sequence_len=args.seq_len, window_pattern=args.window_pattern
        )
        return GPT.build(config, "cpu", compute_dtype=torch.float32).eval()

    model = random_model(0)

    # 1. ours vs baseline on the same items, in this process
    timings, per_item = {}, {}
    for name, scorer, batch in (
        ("baseline", BaselineScorer(model, tokenizer.bos_token_id), 1),
        ("ours", core.ModelScorer(model, tokenizer.bos_token_id), args.batch_size),
    ):
        start = time.perf_counter()
        per_item[name] = run_tasks(scorer, tokenizer, model, core_dir, tasks, args.baseline_items, batch)
        timings[name] = time.perf_counter() - start
    subset_items = sum(r.examples for r in per_item["ours"])
    agree = sum(a == b for o, r in zip(per_item["ours"], per_item["baseline"]) for a, b in zip(o.correct, r.correct))

    # 2. the full-size CORE-18 through the command (the machine is shared: the load average is reported)
    load_before = os.getloadavg()[0]
    full, full_seconds = eval_core_command(model, tokenizer, core_dir, args.max_per_task, args.ranks, args.batch_size)
    load_after = os.getloadavg()[0]

    # 3. randomly initialised models, 200 items per task
    random_cores = {}
    for seed in [int(s) for s in args.random_seeds.split(",") if s.strip()]:
        result, _ = eval_core_command(random_model(seed), tokenizer, core_dir, 200, args.ranks, args.batch_size)
        random_cores[seed] = {"core": result["core"], "boolq_accuracy": result["tasks"]["boolq"]["accuracy"]}

    rows = [
        {
            "run": f"baseline, {args.baseline_items}/task, 1 process",
            "items": subset_items,
            "seconds": timings["baseline"],
            "items_per_s": subset_items / timings["baseline"],
        },
        {
            "run": f"ours, {args.baseline_items}/task, 1 process",
            "items": subset_items,
            "seconds": timings["ours"],
            "items_per_s": subset_items / timings["ours"],
        },
        {
            "run": f"picochat eval core, {args.max_per_task}/task, {args.ranks} rank(s)",
            "items": full["examples"],
            "seconds": full_seconds,
            "items_per_s": full["examples"] / full_seconds,
        },
    ]
    print(print_table(rows))
    print(
        print_table(
            [
                {
                    "task": label,
                    "items": t["examples"],
                    "seconds": t["seconds"],
                    "accuracy": t["accuracy"],
                    "centered": t["centered"],
                }
                for label, t in full["tasks"].items()
            ]
        )
    )
    print(f"{full['metric']} at {args.max_per_task} items/task: {full['core']:+.4f}")
    for seed, result in random_cores.items():
        print(
            f"random init seed {seed}: {full['metric']} at 200 items/task = {result['core']:+.4f} "
            f"(boolq accuracy {result['boolq_accuracy']:.3f})"
        )
    print(
        f"ours and baseline agree on {agree} of {subset_items} items; speedup "
        f"{timings['baseline'] / timings['ours']:.1f}x; full run {full_seconds:.0f}s "
        f"({'under' if full_seconds < TEN_MINUTES else 'OVER'} 10 minutes, load average {load_before:.1f} -> "
        f"{load_after:.1f})"
    )
    summary = {
        "benchmark": "core_eval",
        "depth": args.depth, "seq_len": args.seq_len, "window_pattern": args.window_pattern,
        "vocab_size": tokenizer.vocab_size, "tasks": len(tasks), "cpu_count": os.cpu_count(),
        "threads_in_process": torch.get_num_threads(), "ranks": args.ranks,
        "tokenizer_seconds": round(tokenizer_seconds, 1),
        "subset_items": subset_items,
        "baseline_items_per_s": round(subset_items / timings["baseline"], 3),
        "ours_items_per_s": round(subset_items / timings["ours"], 3),
        "speedup_ours_over_baseline": round(timings["baseline"] / timings["ours"], 2),
        "items_agreeing": agree,
        "full_max_per_task": args.max_per_task, "full_items": full["examples"],
        "full_seconds": round(full_seconds, 1), "full_items_per_s": round(full["examples"] / full_seconds, 2),
        "full_under_10_minutes": full_seconds < TEN_MINUTES, "full_core": round(full["core"], 5),
        "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        "random_init_core_200_per_task": {str(k): round(v["core"], 5) for k, v in random_cores.items()},
    }  # fmt: skip
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
