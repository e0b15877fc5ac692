"""`python bench/gpu.py --smoke`: the one-command GPU benchmark runs end to end at tiny sizes on the CPU, so it cannot
rot before a GPU runs it, and prints every field the GPU run fills."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAINING_FIELDS = {"depth", "window_pattern", "fp8", "seq_len", "device_batch_size", "compute_dtype",
                   "first_step_seconds", "tokens_per_second", "step_seconds", "mfu_bf16", "peak_memory_bytes", "loss",
                   "graphs_compiled_after_warmup"}  # fmt: skip
DECODE_FIELDS = {"batch", "ttft_ms", "decode_tokens_per_second", "prefill_mfu", "decode_mfu", "decode_gb_per_s",
                 "decode_bandwidth_fraction", "kv_cache_bytes_per_token"}  # fmt: skip


def test_gpu_benchmark_smoke_run(tmp_path):
    out = tmp_path / "gpu.json"
    # A generous budget: on a loaded test machine the smoke run must not skip items (which the GPU run may do).
    command = [sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--out", str(out), "--budget-seconds", "900"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PICOCHAT_NO_PROGRESS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == report
    assert report["smoke"] is True and report["environment"]["flex_attention"] is True
    for check in report["attention"]:
        for call in ("training", "prefill", "decode"):
            assert check[call]["equal"] is True, check
    assert {item["window_pattern"] for item in report["training"]} == {"SSSL", "L"}
    assert {item["fp8"] for item in report["training"]} == {False, True}
    for item in report["training"]:
        assert TRAINING_FIELDS <= item.keys(), item
        assert item["graphs_compiled_after_warmup"] == 0
    assert [row["batch"] for row in report["decode"]] == [1, 8, 32]
    for row in report["decode"]:
        assert DECODE_FIELDS <= row.keys(), row
    resume = report["resume"]
    assert resume["killed_after_checkpoint"] is not None and resume["weights_equal"] is True, resume
    assert resume["val_bpb_falls"] is True
