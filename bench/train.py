"""Benchmark: pretraining speed and memory on this machine, ours vs the plain-logits baseline, side by side.

    python bench/train.py                 # configurations (a) and (b), 1 warm-up + 3 timed steps each
    python bench/train.py --steps 5 --configs a
    python bench/train.py --compile       # also time torch.compile (CPU: slow to compile, see the JSON)

Configurations (the reference's CPU settings, vocab 32,768, random tokens, fp32 on CPU):
  (a) depth 6, head dim 64, window L, seq 512, device batch 32, total batch 16,384 tokens (no accumulation)
  (b) depth 4, head dim 64, window L, seq 256, device batch 32, total batch 16,384 tokens (2 micro-steps)
Variants, each run in a fresh subprocess so that its peak memory (VmHWM, the resident-set high-water mark) is the
training process's own:
  ours       the model as trained by picochat: softcapped_cross_entropy computes the loss chunk by chunk with its
             gradient (the lm_head backward happens inside "forward"), never holding the fp32 logits
  ours+malloc  the same with GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4194304 (glibc
             >= 2.35): large blocks are mapped on their own, with transparent huge pages, and returned at free.
             glibc's default raises the mmap threshold after the first large free and then keeps freed activations
             in a fragmented heap; this setting makes the resident memory follow the live tensors. It can only be set
             before the process starts (export it, e.g. in runs/*.sh), so picochat does not set it itself
  baseline   the same model and optimizer with the plain formulation (fused_loss=False): full fp32 logits, tanh
             softcap and F.cross_entropy, as the reference computes them
  compiled   ours under torch.compile (only with --compile)
The step is the trainer's (picochat.trainer.Trainer._train_step without data loading): per micro-batch
loss = model(x, y, "sum"); (loss x world / count).backward(); then MuonAdamW.step(). Timed phases: forward,
backward, optimizer. MFU is FLOPs per token (GPT.flops_per_token) x tokens/s over (a) the nominal fp32 peak of the
CPU (hardware.cpu_peak_flops) and (b) the fp32 matmul throughput measured here, in this run (a 2048^3 matmul,
best of several, before and after the configurations). The reference (nanochat) figures on this machine, quoted
in the brief, are printed alongside: (a) ~620 tok/s, 8.5 GiB peak RSS; (b) ~1,025 tok/s, 2.5 GiB.

The machine is shared: the 1-minute load average is printed with every run; compare variants of the same run.
Because wall time depends on the load, the CPU time of the timed steps is reported too, and "idle est." =
tokens / (CPU seconds per step / threads): the speed on an otherwise idle machine if the threads scaled perfectly.
Prints a table, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "a": dict(depth=6, head_dim=64, seq_len=512, device_batch_size=32, total_batch_size=16_384),
    "b": dict(depth=4, head_dim=64, seq_len=256, device_batch_size=32, total_batch_size=16_384),
}
VOCAB_SIZE = 32_768
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4194304"
REFERENCE = {  # nanochat on this machine, as quoted in the brief
    "a": {"tokens_per_second": 620, "peak_rss_gib": 8.5},
    "b": {"tokens_per_second": 1025, "peak_rss_gib": 2.5},
}


def measure_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """fp32 matmul FLOP/s on this machine: the best of `repeats` timings of one size^3 product."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(config_name: str, variant: str, steps: int, warmup: int) -> dict:
    """Run one configuration in this (fresh) process; returns the measurements."""
    import torch

    from picochat.gpt import GPT, GPTConfig
    from picochat.hardware import cpu_peak_flops
    from picochat.trainer import gradient_accumulation_steps

    config = CONFIGS[config_name]
    torch.manual_seed(0)
    model_config = GPTConfig.from_depth(config["depth"], head_dim=config["head_dim"], vocab_size=VOCAB_SIZE,
                                        sequence_len=config["seq_len"], window_pattern="L")  # fmt: skip
    model = GPT.build(model_config, "cpu")
    model.fused_loss = variant != "baseline"  # "ours+malloc" differs from "ours" by its environment only
    optimizer = model.setup_optimizer()
    train_model = torch.compile(model, dynamic=False) if variant == "compiled" else model
    B, T = config["device_batch_size"], config["seq_len"]
    accumulation = gradient_accumulation_steps(config["total_batch_size"], B, T, 1)
    generator = torch.Generator().manual_seed(1)
    scale = torch.tensor(1.0 / config["total_batch_size"])
    timings = []
    compile_seconds = None
    cpu_seconds = 0.0
    for step in range(warmup + steps):
        phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        cpu_start = os.times()
        start = time.perf_counter()
        for _ in range(accumulation):
            tokens = torch.randint(0, VOCAB_SIZE, (B, T + 1), generator=generator)
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            t0 = time.perf_counter()
            loss = train_model(inputs, targets, loss_reduction="sum")
            t1 = time.perf_counter()
            (loss * scale).backward()
            t2 = time.perf_counter()
            phases["forward"] += t1 - t0
            phases["backward"] += t2 - t1
        t3 = time.perf_counter()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        loss.item()
        phases["optimizer"] = time.perf_counter() - t3
        phases["step"] = time.perf_counter() - start
        if step == 0 and variant == "compiled":
            compile_seconds = phases["step"]
        if step >= warmup:
            timings.append(phases)
            cpu_end = os.times()
            cpu_seconds += (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
    mean = {key: sum(t[key] for t in timings) / len(timings) for key in timings[0]}
    tokens_per_second = config["total_batch_size"] / mean["step"]
    nominal_peak, nominal_description = cpu_peak_flops()
    return {
        "config": config_name,
        "variant": variant,
        "threads": torch.get_num_threads(),
        "steps_timed": steps,
        "seconds_per_step": mean["step"],
        "forward_seconds": mean["forward"],
        "backward_seconds": mean["backward"],
        "optimizer_seconds": mean["optimizer"],
        "tokens_per_second": tokens_per_second,
        "cpu_seconds_per_step": cpu_seconds / steps,
        "idle_estimate_tokens_per_second": config["total_batch_size"] / (cpu_seconds / steps / torch.get_num_threads()),
        "flops_per_token": model.flops_per_token(T),
        "model_flops_per_second": model.flops_per_token(T) * tokens_per_second,
        "nominal_peak_flops": nominal_peak,
        "nominal_peak": nominal_description,
        "peak_rss_bytes": peak_rss_bytes(),
        "compile_seconds": compile_seconds,
        "parameters": model.parameter_counts()["total"],
    }


def run_worker(config_name: str, variant: str, steps: int, warmup: int) -> dict:
    command = [sys.executable, __file__, "--worker", config_name, variant, "--steps", str(steps), "--warmup",
               str(warmup)]  # fmt: skip
    # As `picochat pretrain` runs: OpenMP threads sleep rather than spin while waiting (see stages/pretrain.py).
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if variant == "ours+malloc":
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"worker {config_name}/{variant} failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    measured["load_average"] = os.getloadavg()[0]
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="ab", help="which configurations: a, b or ab (default ab)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--compile", action="store_true", help="also run ours under torch.compile")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-logits baseline")
    parser.add_argument("--no-malloc", action="store_true", help="skip the ours+malloc variant")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, steps=args.steps, warmup=args.warmup)), flush=True)
        return

    matmul_before = measure_matmul_flops()
    variants = (["ours"] + ([] if args.no_malloc else ["ours+malloc"]) + ([] if args.no_baseline else ["baseline"])
                + (["compiled"] if args.compile else []))  # fmt: skip
    results = []
    for config_name in args.configs:
        for variant in variants:
            print(f"running ({config_name}) {variant} ...", file=sys.stderr, flush=True)
            results.append(run_worker(config_name, variant, args.steps, args.warmup))
    matmul_after = measure_matmul_flops()
    matmul = max(matmul_before, matmul_after)

    from picochat.common import print_table

    rows = []
    for r in results:
        rows.append({
            "config": r["config"], "variant": r["variant"], "tok/s": f"{r['tokens_per_second']:,.0f}",
            "idle est.": f"{r['idle_estimate_tokens_per_second']:,.0f}",
            "CPU s/step": f"{r['cpu_seconds_per_step']:.1f}",
            "s/step": f"{r['seconds_per_step']:.2f}", "forward": f"{r['forward_seconds']:.2f}",
            "backward": f"{r['backward_seconds']:.2f}", "optimizer": f"{r['optimizer_seconds']:.2f}",
            "peak RSS GiB": f"{r['peak_rss_bytes'] / 2**30:.2f}",
            "MFU nominal": f"{100 * r['model_flops_per_second'] / r['nominal_peak_flops']:.1f}%",
            "MFU measured": f"{100 * r['model_flops_per_second'] / matmul:.1f}%",
            "load": f"{r['load_average']:.1f}",
        })  # fmt: skip
    for config_name in args.configs:
        quoted = REFERENCE[config_name]
        rows.append({"config": config_name, "variant": "reference (quoted)",
                     "tok/s": f"{quoted['tokens_per_second']:,}",
                     "s/step": f"{16_384 / quoted['tokens_per_second']:.2f}",
                     "peak RSS GiB": f"{quoted['peak_rss_gib']:.2f}"})  # fmt: skip
    print(print_table(rows, list(rows[0].keys())))
    print(f"fp32 matmul measured: {matmul_before / 1e9:.0f} GFLOP/s before, {matmul_after / 1e9:.0f} after; "
          f"nominal peak: {results[0]['nominal_peak']} = {results[0]['nominal_peak_flops'] / 1e9:.0f} GFLOP/s")

    summary = {"benchmark": "train", "measured_matmul_flops": matmul,
               "nominal_peak_flops": results[0]["nominal_peak_flops"], "configs": {}}  # fmt: skip
    for config_name in args.configs:
        by_variant = {r["variant"]: r for r in results if r["config"] == config_name}
        ours = by_variant["ours"]
        keys = ("tokens_per_second", "idle_estimate_tokens_per_second", "cpu_seconds_per_step", "seconds_per_step",
                "forward_seconds", "backward_seconds", "optimizer_seconds", "peak_rss_bytes", "compile_seconds",
                "load_average")  # fmt: skip
        entry = {variant: {key: r[key] for key in keys} for variant, r in by_variant.items()}
        entry["reference_quoted"] = REFERENCE[config_name]
        entry["mfu_nominal"] = ours["model_flops_per_second"] / ours["nominal_peak_flops"]
        entry["mfu_measured_matmul"] = ours["model_flops_per_second"] / matmul
        entry["speed_vs_reference_quoted"] = ours["tokens_per_second"] / REFERENCE[config_name]["tokens_per_second"]
        entry["idle_estimate_vs_reference_quoted"] = (ours["idle_estimate_tokens_per_second"]
                                                      / REFERENCE[config_name]["tokens_per_second"])  # fmt: skip
        entry["memory_vs_reference_quoted"] = ours["peak_rss_bytes"] / (REFERENCE[config_name]["peak_rss_gib"] * 2**30)
        if "baseline" in by_variant:
            base = by_variant["baseline"]
            entry["speed_vs_baseline"] = ours["tokens_per_second"] / base["tokens_per_second"]
            entry["idle_estimate_speed_vs_baseline"] = (ours["idle_estimate_tokens_per_second"]
                                                        / base["idle_estimate_tokens_per_second"])  # fmt: skip
            entry["memory_vs_baseline"] = ours["peak_rss_bytes"] / base["peak_rss_bytes"]
        if "ours+malloc" in by_variant:
            tuned = by_variant["ours+malloc"]
            entry["malloc_tuning_memory_vs_ours"] = tuned["peak_rss_bytes"] / ours["peak_rss_bytes"]
            entry["malloc_tuning_memory_vs_reference_quoted"] = tuned["peak_rss_bytes"] / (
                REFERENCE[config_name]["peak_rss_gib"] * 2**30)
        if "compiled" in by_variant:
            entry["compiled_speed_vs_ours"] = by_variant["compiled"]["tokens_per_second"] / ours["tokens_per_second"]
        summary["configs"][config_name] = entry
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
