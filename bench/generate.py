"""Benchmark: generation speed of picochat's Engine against two baselines, side by side in the same run.

  ours       Engine: weights already in the compute dtype, prefill computes the last position's logits only,
             a batch-1 prefill replicated into N rows, no per-step host syncs besides reading the sampled tokens.
  reference  what the reference engine does (REFERENCE.md A.8): the fp32-master model casts its weights to the
             compute dtype inside every forward, the prefill computes logits for every prompt position, the decode
             cache is zero-filled, and the position is read back with .item() every step.
  naive      no cache at all: every step recomputes the whole sequence (the textbook loop).

For each depth (random weights, vocab 32,768, context 2,048), compute dtype and batch size it reports time to first
token (prefill + first sample) and decode tokens/s (after the first token), and from the model's own accounting
(GPT.prefill_flops_per_token, decode_flops_per_token, decode_bytes_per_step) the MFU of prefill and decode and the
fraction of the memory-bandwidth ceiling decoding reaches (nominal peaks on a GPU; on a CPU the FLOP peak is nominal
and the bandwidth a measured copy rate): the best of --repeats runs, taken in
turns (on a shared machine, load only ever slows a run down, so the best run is the closest to the code's own
speed, and both sides get the same chances). Sampling: temperature 1, top-k 50, no stop tokens, no tools.
Prints a table, then ONE JSON line.

    python bench/generate.py                       # depths 4 and 6, fp32 and bf16, batch 1 and 8
    python bench/generate.py --depths 4 --dtypes float32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from picochat.common import print_table
from picochat.engine import Engine, sample_next_token
from picochat.gpt import GPT, GPTConfig
from picochat.hardware import peak_bandwidth, peak_flops
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

VOCAB_SIZE = 32_768


def make_tokenizer() -> Tokenizer:
    """A tokenizer with the right vocabulary size (the engine checks it); its merges do not matter here."""
    ranks = {bytes([b]): b for b in range(256)}
    for i in range(VOCAB_SIZE - len(SPECIAL_TOKENS) - 256):
        ranks[b"\xff\xfe" + i.to_bytes(3, "big")] = 256 + i  # placeholder tokens that never occur in text
    return Tokenizer(ranks)


def timed_generation(steps, batch_size: int) -> tuple[float, float, int]:
    """(seconds to the first token, decode tokens/s after it, decode steps) of a generator of token columns."""
    start = time.perf_counter()
    next(steps)
    first = time.perf_counter()
    count = sum(1 for _ in steps)
    end = time.perf_counter()
    return first - start, batch_size * count / max(end - first, 1e-9), count


# ----------------------------------------------------------------------------------------------------------
# The baselines


@torch.no_grad()
def reference_style_generate(model: GPT, prompt: list[int], num_samples: int, max_tokens: int, seed: int):
    """The reference engine's loop, on the fp32-master model (which casts weights per forward)."""
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed)
    prefill_cache = model.new_kv_cache(batch_size=1, max_len=len(prompt))
    logits = model(torch.tensor([prompt], device=device), kv_cache=prefill_cache)[:, -1]  # all positions' logits
    cache = model.new_kv_cache(batch_size=num_samples, max_len=len(prompt) + max_tokens)
    cache.keys.zero_()
    cache.values.zero_()  # the reference allocates its cache with torch.zeros
    used = prefill_cache.position
    cache.keys[:, :, :used] = prefill_cache.keys[:, :, :used]
    cache.values[:, :, :used] = prefill_cache.values[:, :, :used]
    cache.position = used
    cache.prev_embedding = prefill_cache.prev_embedding.expand(num_samples, -1, -1).clone()
    logits = logits.expand(num_samples, -1)
    for _ in range(max_tokens):
        tokens = sample_next_token(logits, generator, temperature=1.0, top_k=50).tolist()
        position = torch.tensor(cache.position, device=device)
        _ = position.item()  # the reference reads its cache position back every step
        yield tokens
        logits = model(torch.tensor(tokens, device=device).unsqueeze(1), kv_cache=cache)[:, -1]


@torch.no_grad()
def naive_generate(model: GPT, prompt: list[int], num_samples: int, max_tokens: int, seed: int):
    generator = torch.Generator(device=model.device).manual_seed(seed)
    ids = torch.tensor([prompt], device=model.device).expand(num_samples, -1)
    for _ in range(max_tokens):
        logits = model(ids)[:, -1]
        tokens = sample_next_token(logits, generator, temperature=1.0, top_k=50)
        yield tokens.tolist()
        ids = torch.cat([ids, tokens.unsqueeze(1)], dim=1)


# ----------------------------------------------------------------------------------------------------------


def measure(engine: Engine, reference_model: GPT, prompt: list[int], batch: int, args) -> dict:
    """Time ours and the reference in turns (best of args.repeats), and the naive loop once."""

    def ours(tokens: int, seed: int):
        return engine.generate(prompt, num_samples=batch, max_tokens=tokens, temperature=1.0, top_k=50, seed=seed,
                               stop_tokens=())  # fmt: skip

    def reference(tokens: int, seed: int):
        return reference_style_generate(reference_model, prompt, batch, tokens, seed)

    for run in (ours, reference):  # warm-up (allocator, kernel selection)
        timed_generation(run(4, 0), batch)
    measured = {"ours": [], "reference": []}
    for repeat in range(args.repeats):
        for name, run in (("ours", ours), ("reference", reference)):
            measured[name].append(timed_generation(run(args.decode_tokens, repeat), batch))
    naive_ttft, naive_rate, _ = timed_generation(
        naive_generate(reference_model, prompt, batch, args.naive_decode_tokens, 0), batch
    )
    ttft = {name: min(m[0] for m in runs) for name, runs in measured.items()}
    rate = {name: max(m[1] for m in runs) for name, runs in measured.items()}
    use = utilisation(engine.model, len(prompt), args.decode_tokens, batch, ttft["ours"], rate["ours"], args.peaks)
    return {
        **use,
        "ttft_ms_ours": round(ttft["ours"] * 1000, 1),
        "ttft_ms_reference": round(ttft["reference"] * 1000, 1),
        "ttft_ms_naive": round(naive_ttft * 1000, 1),
        "ttft_speedup_vs_reference": round(ttft["reference"] / ttft["ours"], 2),
        "decode_tok_s_ours": round(rate["ours"], 1),
        "decode_tok_s_reference": round(rate["reference"], 1),
        "decode_tok_s_naive": round(naive_rate, 1),
        "decode_speedup_vs_reference": round(rate["ours"] / rate["reference"], 2),
        "decode_speedup_vs_naive": round(rate["ours"] / naive_rate, 2),
    }


def utilisation(
    model: GPT,
    prompt_len: int,
    decode_tokens: int,
    batch: int,
    ttft_seconds: float,
    decode_tokens_per_second: float,
    peaks: tuple[float | None, float | None],
) -> dict:
    """MFU of the prefill and of decoding, and the fraction of the memory-bandwidth ceiling decoding reaches, from the
    model's own accounting (picochat/inference_cost.py) at the mean context length of the decode."""
    peak_flops, peak_bandwidth = peaks
    context = prompt_len + decode_tokens // 2
    steps_per_second = decode_tokens_per_second / batch
    prefill_flops = model.prefill_flops_per_token(prompt_len) * prompt_len
    decode_flops_per_second = decode_tokens_per_second * model.decode_flops_per_token(context)
    bytes_per_second = steps_per_second * model.decode_bytes_per_step(batch, context)
    ratio = lambda value, peak: None if not peak else round(value / peak, 5)  # noqa: E731
    return {
        "prefill_mfu": ratio(prefill_flops / ttft_seconds, peak_flops),
        "decode_mfu": ratio(decode_flops_per_second, peak_flops),
        "decode_gb_per_s": round(bytes_per_second / 1e9, 3),
        "decode_bandwidth_fraction": ratio(bytes_per_second, peak_bandwidth),
        "kv_cache_bytes_per_token": model.kv_cache_bytes_per_token(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="4,6")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--naive-decode-tokens", type=int, default=8, help="the naive loop is slow: fewer steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is stable on a shared machine)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bandwidth, bandwidth_source = peak_bandwidth(device)
    args.peaks = (peak_flops(device), bandwidth)
    tokenizer = make_tokenizer()
    prompt_rng = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, VOCAB_SIZE - len(SPECIAL_TOKENS), (args.prompt_tokens,), generator=prompt_rng).tolist()

    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        config = GPTConfig.from_depth(depth, vocab_size=VOCAB_SIZE, sequence_len=2048)
        torch.manual_seed(depth)
        masters = GPT.build(config, args.device, compute_dtype=torch.float32).eval()
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            # The reference runs its fp32 masters in the compute dtype; ours runs a copy in that dtype.
            reference_model = GPT.build(config, args.device, compute_dtype=dtype).eval()
            reference_model.load_state_dict(masters.state_dict())
            engine = Engine(masters, tokenizer, compute_dtype=dtype, tool=None)
            for batch in [int(b) for b in args.batch_sizes.split(",")]:
                row = {"depth": depth, "dtype": dtype_name, "batch": batch}
                row.update(measure(engine, reference_model, prompt, batch, args))
                rows.append(row)
                print(f"depth {depth} {dtype_name} batch {batch}: decode {row['decode_tok_s_ours']} vs "
                      f"{row['decode_tok_s_reference']} tok/s, first token {row['ttft_ms_ours']} vs "
                      f"{row['ttft_ms_reference']} ms", flush=True)  # fmt: skip

    print()
    print(
        f"device {args.device} ({platform.processor() or platform.machine()}), {args.threads} thread(s), "
        f"prompt {args.prompt_tokens} tokens, {args.decode_tokens} decode steps "
        f"({args.naive_decode_tokens} for naive), best of {args.repeats} (naive: 1 run)"
    )
    titles = {
        "depth": "depth", "dtype": "dtype", "batch": "batch",
        "ttft_ms_ours": "TTFT ms ours", "ttft_ms_reference": "TTFT ms ref", "ttft_ms_naive": "TTFT ms naive",
        "ttft_speedup_vs_reference": "TTFT x ref",
        "decode_tok_s_ours": "tok/s ours", "decode_tok_s_reference": "tok/s ref", "decode_tok_s_naive": "tok/s naive",
        "decode_speedup_vs_reference": "tok/s x ref", "decode_speedup_vs_naive": "tok/s x naive",
        "prefill_mfu": "prefill MFU", "decode_mfu": "decode MFU", "decode_bandwidth_fraction": "of bandwidth",
    }  # fmt: skip
    print(print_table([{title: str(row[key]) for key, title in titles.items()} for row in rows]))
    print(json.dumps({
        "benchmark": "generate", "device": args.device, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens, "naive_decode_tokens": args.naive_decode_tokens,
        "repeats": args.repeats, "statistic": "best of repeats", "peak_flops": args.peaks[0],
        "peak_bandwidth": args.peaks[1], "bandwidth_source": bandwidth_source, "results": rows,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
