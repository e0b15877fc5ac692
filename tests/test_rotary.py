"""RoPE: the rotation's own backward equals autograd through the written-out rotation, and keeps no activations."""

from __future__ import annotations

import torch

from picochat.rotary import _rotate, apply_rotary, rotary_tables


def test_rotation_gradient_equals_autograd_of_the_formula():
    cos, sin = rotary_tables(64, 16, dtype=torch.float64)
    x = torch.randn(2, 64, 3, 16, dtype=torch.float64, requires_grad=True)
    incoming = torch.randn(2, 64, 3, 16, dtype=torch.float64)
    (ours,) = torch.autograd.grad(apply_rotary(x, cos, sin), x, incoming)
    (plain,) = torch.autograd.grad(_rotate(x, cos, sin), x, incoming)
    torch.testing.assert_close(ours, plain, atol=1e-12, rtol=0)
    with torch.no_grad():  # and the forward is the formula itself
        torch.testing.assert_close(apply_rotary(x, cos, sin), _rotate(x, cos, sin), atol=0, rtol=0)


def test_rotation_keeps_only_the_tables_for_backward():
    cos, sin = rotary_tables(128, 32)
    x = torch.randn(4, 128, 2, 32, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        apply_rotary(x * 1.0, cos, sin).sum().backward()
    assert sum(saved) == cos.numel() + sin.numel()  # nothing of x's size
