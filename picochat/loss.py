"""The training loss of the GPT without its logits: cross-entropy of the soft-capped logits
15 tanh(x W^T / 15), computed chunk by chunk with the gradient fused into the forward pass.

With vocab 32,768 the logits of one micro-batch dwarf everything else: 32 x 512 tokens x 32,768 x 4 bytes = 2 GiB
in fp32, and autograd keeps several tensors of that size (logits, tanh, log-softmax, their gradients). The loss
only needs, per token, log(sum_j exp(c_j)) - c_target, and its gradient has a closed form. So the rows are
processed in chunks, and each chunk's gradient is computed right away, while its logits are still at hand:

  z = x W^T            raw logits (chunk of rows x vocab)
  c = 15 tanh(z / 15)  soft-capped logits;  |c| < 15, so exp(c) < 3.3e6 and the sum over the vocabulary cannot
                       overflow fp32: no max-subtraction pass is needed
  loss = log(sum_j exp(c_j)) - c_target
  dloss/dc = softmax(c) - onehot(target)            (0 for rows whose target is -1)
  dloss/dz = dloss/dc * (1 - tanh^2(z / 15))        (the softcap's derivative)
  dloss/dx = dloss/dz W,   dloss/dW = (dloss/dz)^T x

Backward then only scales the stored dloss/dx and dloss/dW by the incoming gradient. Peak memory is one chunk of
logits instead of several full copies, and the same matmuls run (none is recomputed). This needs the loss to be
a sum (or mean) of the per-token losses; a per-token loss with gradients (loss_reduction="none", e.g. RL) takes
the plain path with full logits.

GPT.forward calls softcapped_cross_entropy when it is given targets (GPT.fused_loss, on by default); its plain
formulation with full logits stays in GPT.forward for per-token losses with gradients and for comparisons.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOFTCAP = 15.0  # logits are squashed into (-15, 15)
LOSS_CHUNK_ELEMENTS_CPU = 2**23  # logits per chunk: 32 MiB in fp32, small enough to be reused by malloc
LOSS_CHUNK_ELEMENTS_CUDA = 2**27  # 512 MiB: few, large kernels


def _loss_chunk_rows(device: torch.device, vocab_size: int) -> int:
    budget = LOSS_CHUNK_ELEMENTS_CUDA if device.type == "cuda" else LOSS_CHUNK_ELEMENTS_CPU
    return max(1, budget // vocab_size)


def _softcap_chunk(x, weight, targets, want_gradient: bool):
    """Per-token losses of one chunk of rows (and, if asked, dloss/dz for those rows, fp32). Every full-size pass
    over the (rows x vocab) block costs, so they are counted: matmul, tanh, exp, sum, scale (+ square, multiply-add
    for the gradient). Dividing x (rows x channels) by 15 before the matmul is the same as dividing z after it."""
    tanh = F.linear(x / SOFTCAP, weight).float().tanh_()  # tanh(z / 15)
    valid = targets >= 0
    safe_targets = targets.clamp(min=0).unsqueeze(1)
    target_tanh = tanh.gather(1, safe_targets).squeeze(1)
    exp = torch.mul(tanh, SOFTCAP).exp_()
    sum_exp = exp.sum(dim=1)
    losses = (sum_exp.log() - SOFTCAP * target_tanh) * valid
    if not want_gradient:
        return losses, None
    # softmax - onehot(target), rows with an ignored target zeroed: one pass scales by valid / sum.
    gradient = exp.mul_((valid / sum_exp).unsqueeze(1))
    gradient.scatter_add_(1, safe_targets, -valid.unsqueeze(1).to(gradient.dtype))
    gradient.addcmul_(gradient, tanh.square_(), value=-1)  # times (1 - tanh^2): through the softcap
    return losses, gradient


class _FusedSoftcapCrossEntropy(torch.autograd.Function):
    """Sum of the per-token losses; the gradients are computed in forward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int):
        head = weight[:vocab_size].to(x.dtype)  # the padded rows get no logits and no gradient
        grad_x = torch.empty_like(x)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), device=x.device, dtype=torch.float32)
        rows = _loss_chunk_rows(x.device, vocab_size)
        for start in range(0, x.size(0), rows):
            chunk = slice(start, start + rows)
            losses, gradient = _softcap_chunk(x[chunk], head, targets[chunk], want_gradient=True)
            total += losses.sum()
            gradient = gradient.to(x.dtype)
            torch.matmul(gradient, head, out=grad_x[chunk])
            grad_weight[:vocab_size] += (gradient.T @ x[chunk]).float()
        ctx.save_for_backward(grad_x, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_total.to(grad_x.dtype), grad_weight * grad_total, None, None


def softcapped_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of the soft-capped logits 15 tanh(x W[:vocab]^T / 15) against targets (-1 = ignored),
    computed chunk by chunk. Same values as the plain formulation in GPT.forward; reduction "mean", "sum", or
    "none" (per-token losses shaped like targets, only without gradients)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    flat_x = x.reshape(-1, x.size(-1))
    flat_targets = targets.reshape(-1)
    needs_gradient = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if needs_gradient:
        if reduction == "none":
            raise ValueError("softcapped_cross_entropy: per-token losses with gradients need the full logits")
        total = _FusedSoftcapCrossEntropy.apply(flat_x, weight, flat_targets, vocab_size)
    else:
        with torch.no_grad():
            head = weight[:vocab_size].to(x.dtype)
            rows = _loss_chunk_rows(x.device, vocab_size)
            losses = torch.cat([
                _softcap_chunk(flat_x[i : i + rows], head, flat_targets[i : i + rows], want_gradient=False)[0]
                for i in range(0, flat_x.size(0), rows)
            ])  # fmt: skip
        if reduction == "none":
            return losses.view(targets.shape)
        total = losses.sum()
    if reduction == "sum":
        return total
    return total / (flat_targets >= 0).sum()  # mean over the counted targets (NaN if none, like F.cross_entropy)
