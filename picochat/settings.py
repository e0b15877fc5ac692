"""The settings of the training stages: flag, default, and what a resume keeps."""

from __future__ import annotations

from typing import Any

# Flags whose value is kept in config.json and reused by --resume unless given again. None = derived / unset.
DEFAULTS: dict[str, Any] = {
    "paths": [], "val": [], "text_column": "text",
    "depth": 20, "aspect_ratio": 64, "head_dim": 128, "max_seq_len": 2048, "window_pattern": "SSSL",
    "num_iterations": None, "target_flops": None, "target_param_data_ratio": 12.0,
    "total_batch_size": None, "device_batch_size": 32,
    "embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02, "scalar_lr": 0.5, "weight_decay": 0.28,
    "warmup_steps": 40, "warmdown_ratio": 0.65, "final_lr_frac": 0.05,
    "eval_every": 250, "eval_tokens": 80 * 524_288, "sample_every": 2000, "save_every": 0, "keep_checkpoints": 2,
    "seed": 42, "batch_lr_scale": None, "muon_weight_decay": None, "fp8": False,
    "embedding_dtype": "auto",
}  # fmt: skip
# Flags that define the model or the data stream: changing them on --resume is an error, not an override.
# (The schedule may change: a new --num-iterations is allowed, with a warning.)
FIXED_ON_RESUME = ("depth", "aspect_ratio", "head_dim", "max_seq_len", "window_pattern", "total_batch_size",
                   "paths", "val", "text_column")  # fmt: skip
