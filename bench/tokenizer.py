"""Benchmark: training the tokenizer with rustbpe vs Hugging Face tokenizers, side by side.

Each trainer runs `picochat tokenizer train` in its own subprocess on the same text (the Wikipedia + Gutenberg
TRAIN shards, documents cropped to --doc-cap, at most --max-chars characters, vocabulary 32,768), so wall time and
peak memory (the child's own ru_maxrss, read with os.wait4) are measured per trainer. Each result is then scored
by held-out Wikipedia bytes per token, with GPT-2 alongside for scale.

    python bench/tokenizer.py                      # full size: 100M characters (what our data holds, see below)
    python bench/tokenizer.py --max-chars 5000000  # quick

Note on size: with the default doc cap of 10,000 characters the shared data holds only ~52M characters (the 190
Gutenberg books contribute 10K each, the ~35K Wikipedia articles ~1.4K on average), so a 100M budget trains on
all of it; `--doc-cap 1000000000` feeds a true 100M characters. Prints a table, then one JSON line.

Measured (2 CPU cores shared with other work, vocab 32,768):
    doc cap 10,000 (52.1M chars):  rustbpe 5.7 s, 309 MiB;  hf 10.1 s, 432 MiB  (hf/rustbpe time 1.77x)
                                   held-out Wikipedia bytes/token 4.3587 for both; GPT-2 4.4503 (ratio 0.979)
    no doc cap (100M chars):       rustbpe 10.7 s, 399 MiB; hf 28.7 s, 708 MiB  (hf/rustbpe time 2.69x)
                                   held-out Wikipedia bytes/token 4.2762 for both (more books, less Wikipedia)
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

from picochat.common import print_table, resolve_data_dir
from picochat.stages.tokenizer import load_gpt2
from picochat.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
MEMORY_LIMIT_BYTES = 4 * 1024**3


def find_data_dir(explicit: str | None) -> Path:
    """--data-dir, $PICOCHAT_DATA_DIR / $PICOCHAT_HOME/data, else the shared folder next to the repo."""
    candidate = resolve_data_dir(explicit)
    if not (candidate / "pretrain").is_dir() and not explicit:
        candidate = REPO_ROOT.parent / "shared" / "data"
    if not (candidate / "pretrain").is_dir():
        sys.exit(f"bench/tokenizer.py: no pretrain/ folder under {candidate}; pass --data-dir")
    return candidate


def run_trainer(trainer: str, data_dir: Path, work_dir: Path, args: argparse.Namespace) -> dict:
    run_dir = work_dir / trainer
    pretrain = data_dir / "pretrain"
    # The two folders: their val_* files are held out by split_train_val, so the trainer sees the shard_* files.
    command = [
        sys.executable, "-m", "picochat", "tokenizer", "train",
        str(pretrain / "gutenberg_books"), str(pretrain / "wikipedia_en"),
        "--run-dir", str(run_dir), "--trainer", trainer, "--vocab-size", str(args.vocab_size),
        "--max-chars", str(args.max_chars), "--doc-cap", str(args.doc_cap),
    ]  # fmt: skip
    env = {**os.environ, "PICOCHAT_NO_PROGRESS": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    # wait4 gives this one child's resource usage (ru_maxrss: peak resident memory, KiB on Linux).
    _, status, usage = os.wait4(process.pid, 0)
    wall_seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"bench/tokenizer.py: `{' '.join(command)}` failed with status {process.returncode}")
    config = json.loads((run_dir / "tokenizer" / "config.json").read_text())
    return {
        "trainer": trainer,
        "characters": config["characters"],
        "documents": config["documents"],
        "vocab_size": config["vocab_size"],
        "train_seconds": config["train_seconds"],
        "process_seconds": round(wall_seconds, 2),
        "peak_memory_mib": round(usage.ru_maxrss / 1024, 1),
        "tokenizer": Tokenizer.load(run_dir / "tokenizer"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-chars", type=int, default=100_000_000, help="characters fed to each trainer")
    parser.add_argument("--vocab-size", type=int, default=32_768)
    parser.add_argument("--doc-cap", type=int, default=10_000, help="characters per document (as the stage)")
    parser.add_argument("--data-dir", help="data folder holding pretrain/ and tokenizers/")
    args = parser.parse_args()
    data_dir = find_data_dir(args.data_dir)

    import pyarrow.parquet as pq

    held_out = pq.read_table(data_dir / "pretrain/wikipedia_en/val_00000.parquet", columns=["text"])
    held_out_texts = held_out.column("text").to_pylist()
    held_out_bytes = sum(len(text.encode("utf-8")) for text in held_out_texts)
    gpt2 = load_gpt2(data_dir)
    gpt2_tokens = sum(len(ids) for ids in gpt2.encode_ordinary_batch(held_out_texts, num_threads=4))

    with tempfile.TemporaryDirectory(prefix="picochat_bench_tokenizer_") as work_dir:
        results = [run_trainer(trainer, data_dir, Path(work_dir), args) for trainer in ("rustbpe", "hf")]

    rows = []
    for result in results:
        tokenizer = result.pop("tokenizer")
        tokens = sum(len(ids) for ids in tokenizer.encode(held_out_texts))
        result["wiki_val_bytes_per_token"] = round(held_out_bytes / tokens, 4)
        result["memory_ok"] = result["peak_memory_mib"] * 1024**2 < MEMORY_LIMIT_BYTES
        rows.append(result)
    gpt2_bytes_per_token = round(held_out_bytes / gpt2_tokens, 4)

    print(print_table(rows))
    print(f"GPT-2 on held-out Wikipedia: {gpt2_bytes_per_token} bytes/token ({held_out_bytes:,} bytes)")
    rust, hf = rows
    summary = {
        "benchmark": "tokenizer_training",
        "max_chars": args.max_chars,
        "vocab_size": args.vocab_size,
        "doc_cap": args.doc_cap,
        "cpu_count": os.cpu_count(),
        "rustbpe": rust,
        "hf": hf,
        "gpt2_wiki_val_bytes_per_token": gpt2_bytes_per_token,
        "train_time_ratio_hf_over_rustbpe": round(hf["train_seconds"] / rust["train_seconds"], 3),
        "process_time_ratio_hf_over_rustbpe": round(hf["process_seconds"] / rust["process_seconds"], 3),
        "peak_memory_ratio_hf_over_rustbpe": round(hf["peak_memory_mib"] / rust["peak_memory_mib"], 3),
        "wiki_val_bytes_per_token_ratio_rustbpe_over_gpt2": round(
            rust["wiki_val_bytes_per_token"] / gpt2_bytes_per_token, 4
        ),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
