import math

import pytest
import torch

from picochat.evaluation.bpb import evaluate_bpb


class ConstantLossModel(torch.nn.Module):
    """Loss of every token = its target id / 10 nats (so each position's contribution is known)."""

    def forward(self, inputs, targets, loss_reduction="mean"):
        assert loss_reduction == "none"
        return targets.clamp(min=0).float() / 10


def test_bpb_counts_only_targets_with_bytes():
    token_bytes = torch.tensor([0, 1, 2, 3], dtype=torch.int32)  # token 0 is special (0 bytes)
    targets = torch.tensor([[1, 2, 0, -1], [3, 3, 1, -1]])
    inputs = torch.zeros_like(targets)
    bpb = evaluate_bpb(ConstantLossModel(), [(inputs, targets)], token_bytes)
    # counted targets: 1,2,3,3,1 -> nats 0.1+0.2+0.3+0.3+0.1 = 1.0; bytes 1+2+3+3+1 = 10
    assert bpb == pytest.approx(1.0 / (math.log(2) * 10))


def test_bpb_is_independent_of_batching():
    token_bytes = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    targets = torch.randint(-1, 4, (8, 5), generator=torch.Generator().manual_seed(0))
    one = evaluate_bpb(ConstantLossModel(), [(targets, targets)], token_bytes)
    split = evaluate_bpb(ConstantLossModel(), [(targets[:3], targets[:3]), (targets[3:], targets[3:])], token_bytes)
    assert one == pytest.approx(split, rel=1e-12)


def test_bpb_without_bytes_is_inf_and_max_batches_stops():
    token_bytes = torch.tensor([0, 1], dtype=torch.int32)
    targets = torch.zeros(2, 3, dtype=torch.long)
    assert evaluate_bpb(ConstantLossModel(), [(targets, targets)], token_bytes) == float("inf")

    def endless():
        while True:
            yield targets + 1, targets + 1

    assert evaluate_bpb(ConstantLossModel(), endless(), token_bytes, max_batches=3) == pytest.approx(0.1 / math.log(2))
