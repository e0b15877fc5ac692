"""Benchmark: fitting a long conversation into the model's context (Engine.fit_conversation), the work the server
does for every chat request before it queues it.

After the linear fit (context_fit.py) the 499-message case took 6 ms (before: 1,347 ms), on shared cores.

The case is issue 20's: a system message and 498 alternating user/assistant messages (499 in all; the server's
default limits allow 500 messages and 32,000 characters), about 48 KB as a compact JSON body (issue 20's had 38
KB), in a context of 2,048 tokens with the default reply budget, so that all but the last few exchanges must be
dropped. The text is real Wikipedia prose (from $PICOCHAT_DATA_DIR) cut into 64-character messages, tokenized by a
BPE of 8,192 tokens trained on other articles of the same shard (its tokens per character are close to a real
run's). Then the same 499 messages behind hostile system messages, whose tail has no letter/digit boundary (the
one case where each candidate first message re-encodes that tail, see context_fit.py): 1,500 spaces, 3,000
newlines, 300 emoji.

Reports the median wall time and CPU time of --repeats fits, the messages kept and the prompt's length. Prints a
line per size (the cost should grow linearly), then ONE JSON line.

    PICOCHAT_DATA_DIR=../shared/data python bench/fit_conversation.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import pyarrow.parquet as pq

from picochat.engine import Engine
from picochat.gpt import GPT, GPTConfig
from picochat.tokenizer import Tokenizer

SHARD = "pretrain/wikipedia_en/shard_00000.parquet"
CONTEXT = 2048
MESSAGE_CHARS = 64


HOSTILE_SYSTEMS = {"1500 spaces": " " * 1500, "3000 newlines": "\n" * 3000, "300 emoji": "\U0001f600" * 300}


def conversation(text: str, messages: int, system: str = "You are a helpful assistant. Answer briefly.") -> list[dict]:
    """A system message, then user/assistant messages of MESSAGE_CHARS characters each, ending with a user one."""
    pieces = [text[i : i + MESSAGE_CHARS] for i in range(0, MESSAGE_CHARS * messages, MESSAGE_CHARS)]
    chat = [{"role": "system", "content": system}]
    for index in range(messages - 1):
        chat.append({"role": "user" if index % 2 == 0 else "assistant", "content": pieces[index]})
    return chat


def measure(engine: Engine, messages: list[dict], repeats: int) -> dict:
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        kept, prompt = engine.fit_conversation(messages)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {
        "messages": len(messages), "characters": sum(len(m["content"]) for m in messages),
        "body_bytes": len(json.dumps({"messages": messages}, separators=(",", ":"), ensure_ascii=False).encode()),
        "kept_messages": len(kept), "prompt_tokens": len(prompt),
        "wall_ms_median": round(1000 * statistics.median(walls), 2),
        "cpu_ms_median": round(1000 * statistics.median(cpus), 2),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="63,125,249,499", help="conversation lengths in messages")
    parser.add_argument("--shared-cpu", action="store_true", help="label the figures as measured on shared cores")
    args = parser.parse_args()
    data_dir = Path(os.environ.get("PICOCHAT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    articles = pq.read_table(data_dir / SHARD, columns=["text"]).column("text").to_pylist()
    tokenizer = Tokenizer.train(articles[:2000], vocab_size=8192)
    text = " ".join(articles[2000:2400]).replace("\n", " ")
    # Only the context length matters here: the smallest model that has one.
    config = GPTConfig(sequence_len=CONTEXT, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=1,
                       n_embd=32)  # fmt: skip
    engine = Engine(GPT.build(config, "cpu").eval(), tokenizer)
    engine.fit_conversation(conversation(text, 9))  # warm-up (not counted)
    from picochat import engine as engine_module

    engine_module.warn = lambda message: None  # the drop notice, once per fit: not what is measured
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        row = measure(engine, conversation(text, size), args.repeats)
        rows.append(row)
        print(f"{row['messages']} messages ({row['body_bytes']} bytes): {row['wall_ms_median']} ms wall, "
              f"{row['cpu_ms_median']} ms CPU; kept {row['kept_messages']}, prompt {row['prompt_tokens']} tokens",
              flush=True)  # fmt: skip
    largest = rows[-1]
    for name, system in HOSTILE_SYSTEMS.items():
        row = {"system": name, **measure(engine, conversation(text, largest["messages"], system), args.repeats)}
        rows.append(row)
        print(f"{row['messages']} messages behind a system message of {name}: {row['wall_ms_median']} ms wall; kept "
              f"{row['kept_messages']}, prompt {row['prompt_tokens']} tokens", flush=True)  # fmt: skip
    print(json.dumps({
        "benchmark": "fit_conversation", "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "shared_cpu": args.shared_cpu, "context": CONTEXT, "repeats": args.repeats, "results": rows,
        "largest_wall_ms": largest["wall_ms_median"], "under_50_ms": max(r["wall_ms_median"] for r in rows) < 50,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
