"""Rotary position embeddings (RoPE): each head's channel pairs are rotated by an angle that grows with the
position, so that the dot product of a query and a key depends on their distance only.

Half-split layout: channel i pairs with channel i + D/2 (not with its neighbour), with angle t * base^(-2i / D) at
position t. The base is 100,000 (the reference's; a larger base suits longer contexts).
"""

from __future__ import annotations

import torch

ROPE_BASE = 100_000


def rotary_tables(
    num_positions: int, head_dim: int, *, base: float = ROPE_BASE, device=None, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (1, num_positions, 1, head_dim / 2): angle[t, i] = t * base^(-2i / head_dim).
    Computed in fp32, then stored in the compute dtype."""
    inverse_frequency = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    positions = torch.arange(num_positions, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inverse_frequency)
    return angles.cos()[None, :, None, :].to(dtype), angles.sin()[None, :, None, :].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[..., i], x[..., i + D/2]) of every head by its position's angle (half-split RoPE):
    (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos). Dot products q.k then depend only on relative position.

    Computed as x * [cos, cos] + [x2, x1] * [-sin, sin]: one swap of the halves and one multiply-add over the whole
    head, rather than four products of half-width slices and a concatenation (~3x faster on CPU, and its backward
    needs no zero-filled slice gradients)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotation.apply(x, cos, sin)
    return _rotate(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    swapped = x.unflatten(-1, (2, x.size(-1) // 2)).flip(-2).flatten(-2)
    return torch.addcmul(x * torch.cat([cos, cos], dim=-1), swapped, torch.cat([-sin, sin], dim=-1))


class _Rotation(torch.autograd.Function):
    """RoPE with a backward that keeps no activations. The rotation is linear and orthogonal, so its gradient is the
    inverse rotation of the incoming gradient (the angle negated). Autograd of _rotate would keep x and its
    half-swapped copy for q and for k: four tensors of the attention's width per layer, a tenth of the eager
    activation memory at d6."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad_output):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_output, cos, -sin), None, None
