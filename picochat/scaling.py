"""The depth dial: every size, batch, horizon and learning rate of a pretraining run, derived from --depth.

The reference's scaling rules (REFERENCE.md A.4), as `picochat pretrain` applies them and `picochat run --dry-run`
prints them (one function, so the plan and the run cannot disagree):

  width     model_dim = ceil(depth x aspect_ratio / head_dim) x head_dim; heads = model_dim / head_dim
  horizon   --num-iterations, else --target-flops / (FLOPs per token x batch), else target_tokens / batch with
            target_tokens D = --target-param-data-ratio x scaling params (transformer matrices + lm_head)
  batch     B = 2^round(log2(B_ref x (D / D_ref)^0.383)) tokens (Power Lines), B_ref = 2^19 and D_ref = the same
            ratio x the scaling params of a depth-12 model of the same shape rules; or --total-batch-size
  LRs       every AdamW and Muon learning rate x sqrt(B / B_ref) (not the fixed smear/backout group)
  decay     Muon weight decay = --weight-decay x sqrt(B / B_ref) x D_ref / D, then a cosine to 0 over the run
"""

from __future__ import annotations

import math
from typing import Any

from picochat.common import PicochatError

B_REF = 2**19  # tokens per step of the reference depth-12 run
REF_DEPTH = 12
BATCH_EXPONENT = 0.383  # Power Lines: optimal batch ~ D^0.383


def derive_plan(flags: dict[str, Any], vocab_size: int, world_size: int) -> dict[str, Any]:
    import torch

    from picochat.gpt import GPT, GPTConfig, model_class
    from picochat.trainer import gradient_accumulation_steps

    architecture = flags.get("architecture", "reference")
    # The portable architecture has full attention in every layer: the reference's default SSSL does not apply.
    pattern = "L" if architecture == "portable" else flags["window_pattern"]

    def meta_model(depth: int) -> GPT:
        config = GPTConfig.from_depth(depth, aspect_ratio=flags["aspect_ratio"], head_dim=flags["head_dim"],
                                      vocab_size=vocab_size, sequence_len=flags["max_seq_len"],
                                      window_pattern=pattern, architecture=architecture)  # fmt: skip
        with torch.device("meta"):
            return model_class(config)(config, compute_dtype=torch.float32)

    model = meta_model(flags["depth"])
    scaling_params = model.num_scaling_params()
    ratio = flags["target_param_data_ratio"]
    target_tokens = ratio * scaling_params  # D
    reference_tokens = ratio * meta_model(REF_DEPTH).num_scaling_params()  # D_ref
    total_batch_size = flags["total_batch_size"]
    batch_source = "--total-batch-size"
    if total_batch_size is None:
        total_batch_size = 2 ** round(math.log2(B_REF * (target_tokens / reference_tokens) ** BATCH_EXPONENT))
        batch_source = f"auto: 2^round(log2({B_REF} x (D/D_ref)^{BATCH_EXPONENT}))"
    seq_len = flags["max_seq_len"]
    flops_per_token = model.flops_per_token(seq_len)
    if flags["num_iterations"] is not None:
        num_iterations, horizon = flags["num_iterations"], "--num-iterations"
    elif flags["target_flops"] is not None:
        num_iterations = round(flags["target_flops"] / (flops_per_token * total_batch_size))
        horizon = "--target-flops"
    else:
        num_iterations, horizon = int(target_tokens // total_batch_size), "--target-param-data-ratio"
    if num_iterations < 1:
        raise PicochatError(f"the horizon ({horizon}) gives {num_iterations} steps of {total_batch_size:,} tokens; "
                            "raise it or lower --total-batch-size")  # fmt: skip
    batch_scale = flags["batch_lr_scale"] or math.sqrt(total_batch_size / B_REF)
    weight_decay = flags["muon_weight_decay"]
    if weight_decay is None:
        weight_decay = flags["weight_decay"] * math.sqrt(total_batch_size / B_REF) * reference_tokens / target_tokens
    accumulation = gradient_accumulation_steps(total_batch_size, flags["device_batch_size"], seq_len, world_size)
    counts = model.parameter_counts()
    tokens = num_iterations * total_batch_size
    return {
        "model_config": model.config.to_dict(),
        "window_sizes": model.window_sizes,
        "parameters": counts,
        "scaling_params": scaling_params,
        "flops_per_token": flops_per_token,
        "target_tokens": int(target_tokens),
        "reference_tokens": int(reference_tokens),
        "total_batch_size": total_batch_size,
        "batch_source": batch_source,
        "num_iterations": num_iterations,
        "horizon_source": horizon,
        "training_tokens": tokens,
        "training_flops": float(flops_per_token * tokens),
        "tokens_per_scaling_param": tokens / scaling_params,
        "world_size": world_size,
        "gradient_accumulation": accumulation,
        "batch_lr_scale": batch_scale,
        "embedding_lr": flags["embedding_lr"] * batch_scale,
        "unembedding_lr": flags["unembedding_lr"] * batch_scale,
        "matrix_lr": flags["matrix_lr"] * batch_scale,
        "scalar_lr": flags["scalar_lr"] * batch_scale,
        "weight_decay": weight_decay,
    }
