"""Benchmark: `picochat serve` under 1, 8 and 32 concurrent streaming clients, continuous batching against one
request at a time, side by side in the same run.

  ours      `picochat serve --max-batch 32`: concurrent requests share forward passes (continuous batching).
  baseline  the same server with `--max-batch 1`: one request decodes at a time, the others wait in the queue (the
            reference's server did this, one request per worker; REFERENCE.md B.1).

Each server is the real command in its own process, on 127.0.0.1, serving a small random-weight model saved as a
run folder (depth 4, width 256, vocab 32,768, context 1,024). Each client streams --requests chat completions
one after the other (temperature 1, max_tokens --max-tokens, a different seed per request) through
/v1/chat/completions with stream_options.include_usage, and the bench records: errors (any non-200 status or
broken stream), completion tokens (from the usage chunk), the time to the first streamed text (TTFT), and the
wall time. Aggregate tokens/s = all completion tokens / wall time of the whole concurrency level.
Prints a table, then ONE JSON line.

    python bench/serve.py                                  # 1, 8, 32 clients, both servers
    python bench/serve.py --clients 1,32 --requests 2 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from picochat.checkpoint import save_checkpoint
from picochat.common import atomic_write_json, print_table
from picochat.gpt import GPT, GPTConfig
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

VOCAB_SIZE = 32_768
QUESTIONS = ["Why is the sky blue?", "Write a haiku about the sea.", "What is 12 times 7?", "Tell me about Rome."]


def make_run(folder: Path, depth: int) -> None:
    """A run folder with a tokenizer of the real vocabulary size and a random-weight model (speed, not quality)."""
    ranks = {bytes([b]): b for b in range(256)}
    for i in range(VOCAB_SIZE - len(SPECIAL_TOKENS) - 256):
        ranks[b"\xff\xfe" + i.to_bytes(3, "big")] = 256 + i  # placeholder merges that never occur in text
    Tokenizer(ranks).save(folder / "tokenizer")
    config = GPTConfig.from_depth(depth, vocab_size=VOCAB_SIZE, sequence_len=1024)
    torch.manual_seed(0)
    model = GPT.build(config, "cpu", compute_dtype=torch.float32)
    with torch.no_grad():  # the reference init zeroes the output projections: give the blocks something to do
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
        model.lm_head.weight.normal_(0, 0.02)
    save_checkpoint(folder / "sft", 1, model.state_dict(), {})
    atomic_write_json(folder / "sft" / "config.json", {"model": config.to_dict()})


class Server:
    """`picochat serve` in a subprocess on a free loopback port; stopped with SIGINT."""

    def __init__(self, run_dir: Path, max_batch: int, threads: int, log_path: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "PICOCHAT_NO_PROGRESS": "1"}
        command = [sys.executable, "-m", "picochat", "serve", "--run-dir", str(run_dir), "--port", str(self.port),
                   "--max-batch", str(max_batch), "--queue-size", "256", "--rate-limit", "0",
                   "--device", "cpu"]  # fmt: skip
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=environment)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).json().get("ready"):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not become ready")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


async def one_request(http: httpx.AsyncClient, url: str, seed: int, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": QUESTIONS[seed % len(QUESTIONS)]}], "max_tokens": max_tokens,
            "temperature": 1.0, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    started = time.perf_counter()
    first_text, tokens, done = None, 0, False
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"error": f"status {response.status_code}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if first_text is None and any(c["delta"].get("content") for c in chunk["choices"]):
                    first_text = time.perf_counter() - started
    except httpx.HTTPError as error:
        return {"error": type(error).__name__}
    if not done:
        return {"error": "stream ended without [DONE]"}
    return {"ttft": first_text, "tokens": tokens}


async def run_level(url: str, clients: int, requests: int, max_tokens: int, seed_base: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:

        async def client(index: int) -> list[dict]:
            return [await one_request(http, url, seed_base + index * requests + r, max_tokens) for r in range(requests)]

        started = time.perf_counter()
        results = [r for per_client in await asyncio.gather(*(client(i) for i in range(clients))) for r in per_client]
        wall = time.perf_counter() - started
    errors = [r["error"] for r in results if "error" in r]
    ttfts = sorted(r["ttft"] for r in results if r.get("ttft") is not None)
    tokens = sum(r.get("tokens", 0) for r in results)
    return {
        "clients": clients, "requests": len(results), "errors": len(errors), "tokens": tokens,
        "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
        "ttft_p99_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1) if ttfts else None,
        "error_examples": errors[:3],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels")
    parser.add_argument("--requests", type=int, default=3, help="requests per client, one after the other")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (1 is stable here)")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    rows = []
    with tempfile.TemporaryDirectory(prefix="picochat-bench-serve-") as folder:
        run_dir = Path(folder) / "run"
        make_run(run_dir, args.depth)
        for name, max_batch in (("ours", max(levels)), ("baseline", 1)):
            server = Server(run_dir, max_batch, args.threads, Path(folder) / f"{name}.log")
            try:
                server.wait_ready()
                asyncio.run(run_level(server.url, 1, 1, 8, seed_base=10**6))  # warm-up (not counted)
                for clients in levels:
                    row = {
                        "server": name,
                        "max_batch": max_batch,
                        **asyncio.run(
                            run_level(server.url, clients, args.requests, args.max_tokens, seed_base=1000 * clients)
                        ),
                    }
                    rows.append(row)
                    print(f"{name} (batch {max_batch}) {clients} clients: {row['tok_s']} tok/s, TTFT p50 "
                          f"{row['ttft_p50_ms']} ms p99 {row['ttft_p99_ms']} ms, {row['errors']} errors",
                          flush=True)  # fmt: skip
            finally:
                server.stop()

    def pick(server: str, clients: int) -> dict:
        return next(r for r in rows if r["server"] == server and r["clients"] == clients)

    most, fewest = max(levels), min(levels)
    ratios = {
        f"ours_tok_s_{most}_vs_{fewest}_clients": round(pick("ours", most)["tok_s"] / pick("ours", fewest)["tok_s"], 2),
        f"baseline_tok_s_{most}_vs_{fewest}_clients": round(
            pick("baseline", most)["tok_s"] / pick("baseline", fewest)["tok_s"], 2),
        f"ours_vs_baseline_tok_s_at_{most}_clients": round(
            pick("ours", most)["tok_s"] / pick("baseline", most)["tok_s"], 2),
        f"ours_vs_baseline_ttft_p50_at_{most}_clients": round(
            pick("baseline", most)["ttft_p50_ms"] / pick("ours", most)["ttft_p50_ms"], 2),
    }  # fmt: skip
    print()
    print(f"cpu ({platform.processor() or platform.machine()}), server threads {args.threads}, depth {args.depth}, "
          f"{args.requests} streaming requests per client of max_tokens {args.max_tokens}")  # fmt: skip
    columns = ["server", "max_batch", "clients", "requests", "errors", "tokens", "wall_s", "tok_s", "ttft_p50_ms",
               "ttft_p99_ms"]  # fmt: skip
    print(print_table([{c: str(row[c]) for c in columns} for row in rows], columns))
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    print(json.dumps({
        "benchmark": "serve", "device": "cpu", "threads": args.threads, "depth": args.depth,
        "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "errors": sum(r["errors"] for r in rows), "results": rows, "ratios": ratios,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
