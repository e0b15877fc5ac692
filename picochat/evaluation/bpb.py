"""Bits per byte: the pretraining metric that does not depend on the tokenizer.

Cross-entropy per token (nats) depends on how much text a token covers, so losses of models with different
vocabularies cannot be compared. Dividing the total loss by the number of UTF-8 bytes the target tokens stand for,
and converting nats to bits, gives a number about the text itself:

    bpb = sum_t loss_t / (ln 2 * sum_t bytes(target_t))

Only targets that stand for text count. Special tokens (BOS, chat delimiters) have 0 bytes in `token_bytes` and
ignored targets (-1, e.g. SFT padding) are dropped: neither their loss nor their bytes enter the sums. Under
torchrun both sums are added over ranks before the division, so the result is the same for any number of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_bytes: torch.Tensor,
    max_batches: int | None = None,
) -> float:
    """Bits per byte of `model` over `batches` of (inputs, targets); `inf` when no target stands for any byte.

    `model(inputs, targets, loss_reduction="none")` must return the per-token loss in nats, shaped like targets.
    """
    total_nats = None
    total_bytes = None
    for index, (inputs, targets) in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        losses = model(inputs, targets, loss_reduction="none").reshape(-1).float()
        targets = targets.reshape(-1)
        table = token_bytes.to(targets.device)
        # -1 targets have no entry in the table: look up a safe index and zero them through the mask.
        valid = targets >= 0
        bytes_per_target = torch.where(valid, table[targets.clamp(min=0)], torch.zeros_like(targets))
        counted = bytes_per_target > 0
        nats = torch.where(counted, losses, torch.zeros_like(losses)).sum()
        byte_count = bytes_per_target.sum()
        total_nats = nats if total_nats is None else total_nats + nats
        total_bytes = byte_count if total_bytes is None else total_bytes + byte_count
    if total_nats is None:
        raise ValueError("evaluate_bpb got no batches")
    total_nats = total_nats.double()
    total_bytes = total_bytes.double()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sums = torch.stack([total_nats, total_bytes])
        torch.distributed.all_reduce(sums)
        total_nats, total_bytes = sums[0], sums[1]
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
