"""Benchmark: picochat.data.iter_documents vs plain pyarrow / json reading of the same files.

Prints a table and ends with ONE JSON line. Tokens/s are estimated with the GPT-2 tokenizer's characters per
token on a sample (the packing loader downstream needs >= 1M tokens/s overall).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from picochat.data import iter_documents

DATA = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data") / "pretrain"


def timed(fn):
    best = None
    for _ in range(3):
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        best = elapsed if best is None or elapsed < best else best
    return result, best


def ours(files, rank=0, world_size=1):
    def run():
        documents = characters = 0
        for text, _ in iter_documents(files, rank=rank, world_size=world_size):
            documents += 1
            characters += len(text)
        return documents, characters

    return run


def baseline_parquet(files):
    def run():
        documents = characters = 0
        for path in files:
            parquet_file = pq.ParquetFile(path)
            for batch in parquet_file.iter_batches(columns=["text"]):
                for text in batch.column(0).to_pylist():
                    documents += 1
                    characters += len(text)
        return documents, characters

    return run


def baseline_jsonl(files):
    def run():
        documents = characters = 0
        for path in files:
            with open(path, encoding="utf-8") as file:
                for line in file:
                    if line.strip():
                        documents += 1
                        characters += len(json.loads(line)["text"])
        return documents, characters

    return run


def chars_per_token(files) -> float:
    import tiktoken.load

    ranks = tiktoken.load.load_tiktoken_bpe(str(DATA.parent / "tokenizers/gpt2.tiktoken"))
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
    encoding = tiktoken.Encoding(
        name="gpt2", pat_str=pattern, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )
    sample = [t for t, _ in zip(iter_documents(files), range(2000))]
    texts = [t for t, _ in sample]
    return sum(map(len, texts)) / sum(len(ids) for ids in encoding.encode_ordinary_batch(texts))


def main() -> None:
    parquet = sorted(DATA.glob("wikipedia_en/shard_*.parquet")) + sorted(DATA.glob("gutenberg_books/shard_*.parquet"))
    jsonl = sorted(DATA.glob("*.jsonl"))
    ratio = chars_per_token(parquet)
    rows = []
    cases = [
        ("parquet, 1 rank", ours(parquet), baseline_parquet(parquet), 1),
        ("parquet, rank 0 of 8", ours(parquet, 0, 8), baseline_parquet(parquet), 8),
        ("jsonl, 1 rank", ours(jsonl), baseline_jsonl(jsonl), 1),
    ]
    for name, ours_fn, base_fn, world_size in cases:
        (documents, characters), ours_s = timed(ours_fn)
        (base_documents, base_characters), base_s = timed(base_fn)
        # Rates are per rank: the text THIS rank receives per second. The baseline reads everything; for the
        # 8-rank case that is what a naive strided reader does (read all, keep every 8th document).
        rows.append(
            {
                "case": name,
                "documents": documents,
                "MB_text": characters / 1e6,
                "ours_s": ours_s,
                "baseline_s": base_s,
                "ours_Mtok_per_s": characters / ratio / ours_s / 1e6,
                "baseline_Mtok_per_s": characters / ratio / base_s / 1e6,
                "ours_vs_baseline": base_s / ours_s,
            }
        )
        assert world_size > 1 or (documents, characters) == (base_documents, base_characters)
    header = (
        f"{'case':22} {'docs':>7} {'MB':>7} {'ours s':>7} {'base s':>7} {'ours Mtok/s':>11} "
        f"{'base Mtok/s':>11} {'speed ratio':>11}"
    )
    print(f"chars per GPT-2 token: {ratio:.2f}")
    print(header)
    for r in rows:
        print(
            f"{r['case']:22} {r['documents']:>7} {r['MB_text']:>7.1f} {r['ours_s']:>7.3f} {r['baseline_s']:>7.3f} "
            f"{r['ours_Mtok_per_s']:>11.2f} {r['baseline_Mtok_per_s']:>11.2f} {r['ours_vs_baseline']:>11.2f}"
        )
    print(
        json.dumps(
            {
                "bench": "data_reading",
                "chars_per_token": round(ratio, 3),
                "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
            }
        )
    )


if __name__ == "__main__":
    main()
