"""Benchmark: CPU pretraining speed and memory, picochat vs a reference-style baseline, side by side in one run.

    python bench/train.py                              # both configurations, ours vs the reference-style baseline
    python bench/train.py --configs cpu --rounds 2     # ABAB: each variant twice, medians (the machine drifts)
    python bench/train.py --compile                    # also picochat under torch.compile
    python bench/train.py --stage-vs HEAD~3 --tokenizer runs/cpu/tokenizer   # + the pretraining stage, old vs new

Configurations (vocab 8,192, fp32, random tokens: a step's cost does not depend on which tokens it sees; the
loader's cost is measured on its own by bench/loader.py and is ~0.3% of a cpu-preset step):
  cpu  the cpu preset: depth 4, head dim 128, windows SSSL, seq 512, 8 rows, 4,096 tokens per step
  d6   the reference's CPU recipe: depth 6, head dim 64, window L, seq 512, 32 rows, 16,384 tokens per step
Variants, each in a fresh subprocess so that its peak memory (VmHWM) is its own:
  ours       what `picochat pretrain` runs on a CPU: eager, the chunked fused loss (picochat/loss.py), the
             fused AdamW kernel, RoPE and ReLU^2 backwards that keep no activations
  compiled   ours under torch.compile (--compile)
  reference  the reference's formulation: full fp32 logits, tanh softcap and F.cross_entropy, the model under
             torch.compile and the optimizer's update functions compiled, as the reference runs on a CPU
The step is the trainer's: per micro-batch loss = model(x, y, "sum"); (loss / tokens).backward(); then the optimizer
step. Phases timed: forward, backward, optimizer. "first step" is the wall time of the first step (compilation
included), "short run" = first step + the timed steps: what a user waits for.

--stage-vs REV also runs the real `picochat pretrain` stage (the cpu preset's shape, --stage-steps steps, real data
from $PICOCHAT_DATA_DIR) twice: from a temporary git worktree at REV, and from this checkout, one after the other,
and reports the wall time of each and their ratio.

The machine may be shared: the 1-minute load average is printed with every variant; compare within one run.
Prints a table, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {
    "cpu": dict(depth=4, head_dim=128, window_pattern="SSSL", seq_len=512, device_batch_size=8, total_batch_size=4096),
    "d6": dict(depth=6, head_dim=64, window_pattern="L", seq_len=512, device_batch_size=32, total_batch_size=16_384),
}
VOCAB_SIZE = 8192
VARIANTS = ("ours", "compiled", "reference")


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(config_name: str, variant: str, steps: int) -> dict:
    """Train one configuration for 1 + steps steps in this (fresh) process; returns the measurements."""
    import torch

    from picochat.gpt import GPT, GPTConfig
    from picochat.trainer import gradient_accumulation_steps

    config = CONFIGS[config_name]
    torch.manual_seed(0)
    model_config = GPTConfig.from_depth(
        config["depth"], head_dim=config["head_dim"], vocab_size=VOCAB_SIZE, sequence_len=config["seq_len"],
        window_pattern=config["window_pattern"],
    )  # fmt: skip
    model = GPT.build(model_config, "cpu")
    model.fused_loss = variant != "reference"
    optimizer = model.setup_optimizer(compile=variant == "reference")
    train_model = torch.compile(model, dynamic=False) if variant in ("compiled", "reference") else model
    B, T = config["device_batch_size"], config["seq_len"]
    accumulation = gradient_accumulation_steps(config["total_batch_size"], B, T, 1)
    generator = torch.Generator().manual_seed(1)
    scale = 1.0 / config["total_batch_size"]
    timings, first_step = [], None
    for step in range(1 + steps):
        phases = {"forward": 0.0, "backward": 0.0}
        start = time.perf_counter()
        for _ in range(accumulation):
            tokens = torch.randint(0, VOCAB_SIZE, (B, T + 1), generator=generator)
            t0 = time.perf_counter()
            loss = train_model(tokens[:, :-1], tokens[:, 1:], loss_reduction="sum")
            t1 = time.perf_counter()
            (loss * scale).backward()
            phases["forward"] += t1 - t0
            phases["backward"] += time.perf_counter() - t1
        t2 = time.perf_counter()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        loss.item()
        phases["optimizer"] = time.perf_counter() - t2
        phases["step"] = time.perf_counter() - start
        if step == 0:
            first_step = phases["step"]
        else:
            timings.append(phases)
    median = {key: statistics.median(t[key] for t in timings) for key in timings[0]}
    return {
        "config": config_name,
        "variant": variant,
        "threads": torch.get_num_threads(),
        "steps_timed": steps,
        "seconds_per_step": median["step"],
        "forward_seconds": median["forward"],
        "backward_seconds": median["backward"],
        "optimizer_seconds": median["optimizer"],
        "tokens_per_second": config["total_batch_size"] / median["step"],
        "first_step_seconds": first_step,
        "short_run_seconds": first_step + sum(t["step"] for t in timings),
        "peak_rss_bytes": peak_rss_bytes(),
        "parameters": model.parameter_counts()["total"],
    }


def run_worker(config_name: str, variant: str, steps: int) -> dict:
    command = [sys.executable, __file__, "--worker", config_name, variant, "--steps", str(steps)]
    # As `picochat pretrain` runs: OpenMP threads sleep rather than spin while waiting (see stages/pretrain.py).
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"worker {config_name}/{variant} failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    measured["load_average"] = os.getloadavg()[0]
    return measured


def run_stage(source: Path, tokenizer: Path, steps: int, work: Path) -> dict:
    """`picochat pretrain` at the cpu preset's shape for `steps` steps, from the code in `source`."""
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(tokenizer, run_dir / "tokenizer")
    data_dir = os.environ.get("PICOCHAT_DATA_DIR", str(REPO.parent / "shared" / "data"))
    command = [sys.executable, "-m", "picochat", "pretrain", "--run-dir", str(run_dir), "--data-dir", data_dir,
               "--depth", "4", "--max-seq-len", "512", "--device-batch-size", "8", "--total-batch-size", "4096",
               "--num-iterations", str(steps), "--eval-every", str(max(1, steps // 2)), "--eval-tokens", "32768",
               "--save-every", str(max(1, steps // 2)), "--sample-every", "0"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(source), "PICOCHAT_NO_PROGRESS": "1"}
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=source)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"pretrain from {source} failed:\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "base" / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row.get("event") == "train"]
    evals = [row for row in rows if row.get("event") == "eval"]
    return {"wall_seconds": wall, "training_seconds": train[-1]["training_seconds"],
            "median_tokens_per_second": statistics.median(row["tokens_per_second"] for row in train[1:]),
            "final_val_bpb": evals[-1]["val_bpb"], "final_loss": train[-1]["loss"],
            "load_average": os.getloadavg()[0]}  # fmt: skip


def compare_stage(revision: str, tokenizer: Path, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="picochat-bench-") as temporary:
        work = Path(temporary)
        old = work / "old"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), revision], check=True,
                       capture_output=True)  # fmt: skip
        try:
            print(f"pretraining stage at {revision} ...", file=sys.stderr, flush=True)
            before = run_stage(old, tokenizer, steps, work)
            print("pretraining stage at this checkout ...", file=sys.stderr, flush=True)
            after = run_stage(REPO, tokenizer, steps, work)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], capture_output=True)
    return {"revision": revision, "steps": steps, "before": before, "after": after,
            "wall_ratio": after["wall_seconds"] / before["wall_seconds"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="cpu,d6", help="comma-separated: cpu, d6 (default both)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant, after the first (default 3)")
    parser.add_argument("--rounds", type=int, default=1, help="run every variant this many times, interleaved")
    parser.add_argument("--compile", action="store_true", help="also time picochat under torch.compile")
    parser.add_argument("--stage-vs", metavar="REV", help="also time the pretraining stage at git revision REV")
    parser.add_argument("--stage-steps", type=int, default=60, help="steps of that stage run (default 60)")
    parser.add_argument("--tokenizer", type=Path, help="a trained 8,192-token tokenizer folder (for --stage-vs)")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, steps=args.steps)), flush=True)
        return
    configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown or args.steps < 1 or args.rounds < 1:
        parser.error(f"--configs takes {', '.join(CONFIGS)}; --steps and --rounds must be >= 1")
    if args.stage_vs and (args.tokenizer is None or not (args.tokenizer / "tokenizer.json").is_file()):
        parser.error("--stage-vs needs --tokenizer DIR, a folder with a trained tokenizer.json")
    variants = [v for v in VARIANTS if v != "compiled" or args.compile]

    results = []
    for config_name in configs:
        for _ in range(args.rounds):
            for variant in variants:
                print(f"running {config_name} / {variant} ...", file=sys.stderr, flush=True)
                results.append(run_worker(config_name, variant, args.steps))

    from picochat.common import print_table

    summary: dict = {"benchmark": "train", "vocab_size": VOCAB_SIZE, "rounds": args.rounds, "configs": {}}
    rows = []
    for config_name in configs:
        entry = {}
        for variant in variants:
            runs = [r for r in results if r["config"] == config_name and r["variant"] == variant]
            keys = [key for key, value in runs[0].items() if isinstance(value, float) or key == "peak_rss_bytes"]
            merged = {key: statistics.median(r[key] for r in runs) for key in keys}
            entry[variant] = merged
            rows.append({
                "config": config_name, "variant": variant, "tok/s": f"{merged['tokens_per_second']:,.0f}",
                "s/step": f"{merged['seconds_per_step']:.2f}", "forward": f"{merged['forward_seconds']:.2f}",
                "backward": f"{merged['backward_seconds']:.2f}", "optimizer": f"{merged['optimizer_seconds']:.2f}",
                "first step": f"{merged['first_step_seconds']:.1f}", "short run": f"{merged['short_run_seconds']:.1f}",
                "peak RSS GiB": f"{merged['peak_rss_bytes'] / 2**30:.2f}", "load": f"{merged['load_average']:.1f}",
            })  # fmt: skip
        reference, ours = entry["reference"], entry["ours"]
        entry["speed_vs_reference"] = ours["tokens_per_second"] / reference["tokens_per_second"]
        entry["memory_vs_reference"] = ours["peak_rss_bytes"] / reference["peak_rss_bytes"]
        entry["short_run_vs_reference"] = ours["short_run_seconds"] / reference["short_run_seconds"]
        if "compiled" in entry:
            compiled = entry["compiled"]
            entry["compiled_speed_vs_reference"] = compiled["tokens_per_second"] / reference["tokens_per_second"]
            entry["compiled_memory_vs_reference"] = compiled["peak_rss_bytes"] / reference["peak_rss_bytes"]
        summary["configs"][config_name] = entry
    print(print_table(rows, list(rows[0].keys())))
    for config_name, entry in summary["configs"].items():
        speed, memory, wall = (entry[f"{k}_vs_reference"] for k in ("speed", "memory", "short_run"))
        print(
            f"{config_name}: ours vs reference-style: speed {speed:.2f}x, peak RSS {memory:.2f}x, short run {wall:.2f}x"
        )
    if args.stage_vs:
        stage = compare_stage(args.stage_vs, args.tokenizer.resolve(), args.stage_steps)
        summary["pretraining_stage"] = stage
        print(f"pretraining stage, {stage['steps']} steps: {stage['before']['wall_seconds']:.0f} s at {args.stage_vs}, "
              f"{stage['after']['wall_seconds']:.0f} s now ({stage['wall_ratio']:.2f}x); val bpb "
              f"{stage['before']['final_val_bpb']:.4f} -> {stage['after']['final_val_bpb']:.4f}")  # fmt: skip
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
