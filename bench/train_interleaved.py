"""Benchmark: this CPU path with and without its speed changes, alternating every step in ONE process.

    python bench/train_interleaved.py                  # the cpu preset's shape, 12 steps each
    python bench/train_interleaved.py --config d6 --steps 4

Why one process: on a shared or virtualised 2-core machine the speed drifts by +-15% over minutes, so two variants
timed one after the other (bench/train.py runs each in its own process, which it needs for peak memory) can swap
places between runs. Alternating step by step gives both variants the same machine. "before" switches off, by
replacing them at run time: the blocked short-window attention (attention._blocks_pay), the fused AdamW kernel
(optim._fused_adamw_applies) and RoPE's own backward (gpt.apply_rotary -> rotary._rotate). Reports wall and CPU time
(medians) and their ratios; prints ONE JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

CONFIGS = {  # depth, head dim, windows, rows per micro-batch, tokens per step (seq 512, vocab 8,192)
    "cpu": (4, 128, "SSSL", 8, 4096),
    "d6": (6, 64, "L", 32, 16_384),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (default 12)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    import torch

    from picochat import attention, gpt, optim, rotary

    depth, head_dim, windows, rows, total = CONFIGS[args.config]
    now = (attention._blocks_pay, optim._fused_adamw_applies, gpt.apply_rotary)
    before = (lambda tokens, window: False, lambda param, grad: False, rotary._rotate)

    def use(functions) -> None:
        attention._blocks_pay, optim._fused_adamw_applies, gpt.apply_rotary = functions

    torch.manual_seed(0)
    config = gpt.GPTConfig.from_depth(depth, head_dim=head_dim, vocab_size=8192, sequence_len=512,
                                      window_pattern=windows)  # fmt: skip
    model = gpt.GPT.build(config, "cpu")
    optimizer = model.setup_optimizer()
    generator = torch.Generator().manual_seed(1)
    wall: dict[str, list[float]] = {"before": [], "now": []}
    cpu: dict[str, list[float]] = {"before": [], "now": []}
    for index in range(2 + 2 * args.steps):  # two untimed warm-up steps first
        variant = "now" if index % 2 == 0 else "before"
        use(now if variant == "now" else before)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(total // (rows * 512)):
            tokens = torch.randint(0, 8192, (rows, 513), generator=generator)
            loss = model(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), loss_reduction="sum")
            (loss / total).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        if index >= 2:
            wall[variant].append(time.perf_counter() - start)
            cpu[variant].append(time.process_time() - cpu_start)
    use(now)
    summary = {"benchmark": "train_interleaved", "config": args.config, "steps_per_variant": args.steps}
    for variant in ("before", "now"):
        seconds = statistics.median(wall[variant])
        summary[variant] = {"tokens_per_second": total / seconds, "seconds_per_step": seconds,
                            "cpu_seconds_per_step": statistics.median(cpu[variant])}  # fmt: skip
        print(f"{variant:>6}: {total / seconds:,.0f} tok/s, {seconds:.3f} s/step, "
              f"CPU {statistics.median(cpu[variant]):.3f} s/step")  # fmt: skip
    summary["speed_now_vs_before"] = summary["before"]["seconds_per_step"] / summary["now"]["seconds_per_step"]
    summary["cpu_now_vs_before"] = summary["before"]["cpu_seconds_per_step"] / summary["now"]["cpu_seconds_per_step"]
    print(f"now vs before: {summary['speed_now_vs_before']:.3f}x wall, {summary['cpu_now_vs_before']:.3f}x CPU")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
