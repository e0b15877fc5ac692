"""FP8 training for the model's large Linears: tensorwise dynamic scaling (REFERENCE.md A.11), behind `--fp8`.

One recipe only. Every call of an FP8 Linear in training:
  forward   x and W are each scaled by 448 / amax (one scale per tensor, recomputed every call: "dynamic") and cast
            to float8_e4m3fn (3 mantissa bits, max 448); y = (x8 @ W8^T) / (scale_x scale_W), output in x's dtype.
  backward  the incoming gradient g is scaled by 57344 / amax and cast to float8_e5m2 (2 mantissa bits but the
            range gradients need, max 57344); dx = g8 @ W8 and dW = g8^T @ x8, unscaled the same way, dW in fp32
            for the fp32 master. The FP8 copies of x and W made in forward are what backward reuses (half the bytes
            of keeping bf16 x).
The amax is taken in fp32 and the scale divided in fp64, so compiled and eager code compute the same scale; values
are clamped to the format's range before the cast (a cast does not saturate: out-of-range values become NaN).

Which Linears: both dimensions multiples of 16 and the smaller at least 128 (the reference's filter: FP8 tensor
cores want 16-aligned shapes, and tiny matmuls only lose precision). That is every attention and MLP matrix of a
real model, not the value-embedding and smear gates. The lm_head is left in bf16 here: its matmul lives inside the
fused chunked loss (picochat/loss.py), which keeps its own bf16 matmuls.

Where the matmuls run. On CUDA GPUs with FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell)
`torch._scaled_mm`. Anywhere else (the CPU tests, `picochat pretrain --fp8` on a laptop) the same quantisation runs
and the matmul is emulated: the FP8 values are cast back up and multiplied in fp32, then scaled. The numbers are
FP8's (up to the matmul's accumulation order), the speed is not; enable_fp8 says so once.

FP8 is a training-time state of the modules, not of the weights: it is used only in training mode with gradients
on, so evaluation and sampling during training run in bf16, and a checkpoint is the same fp32 state dict either way
(an FP8 run's weights load into a run without FP8, and the reverse).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from picochat.common import PicochatError, log

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
E4M3_MAX = torch.finfo(E4M3).max  # 448
E5M2_MAX = torch.finfo(E5M2).max  # 57344
MIN_DIMENSION = 128


def eligible(linear: nn.Linear) -> bool:
    """The reference's filter: both dimensions multiples of 16, the smaller at least 128."""
    out_features, in_features = linear.weight.shape
    return out_features % 16 == 0 and in_features % 16 == 0 and min(out_features, in_features) >= MIN_DIMENSION


def native_fp8_available(device: torch.device) -> bool:
    """True where torch._scaled_mm runs on FP8 tensor cores: CUDA, compute capability 8.9 or newer."""
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm") and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 9))  # fmt: skip


def enable_fp8(model: nn.Module, device: torch.device) -> int:
    """Switch every eligible Linear of `model` (a picochat GPT) to FP8 training; returns how many were switched.
    On a device without FP8 tensor cores other than the CPU this is an error (emulating there would only be slow);
    on the CPU the matmuls are emulated, and the log says so."""
    if device.type == "cuda" and not native_fp8_available(device):
        name = torch.cuda.get_device_name(device)
        raise PicochatError(f"--fp8 needs a GPU with FP8 tensor cores (compute capability 8.9+, e.g. H100, L4); {name} "
                            "has none: train without --fp8")  # fmt: skip
    if device.type not in ("cuda", "cpu"):
        raise PicochatError(f"--fp8 runs on CUDA (or emulated on the CPU), not on {device.type}")
    switched = 0
    head = getattr(model, "lm_head", None)  # multiplied inside the fused loss, in bf16 (see the module docstring)
    for module in model.modules():
        if isinstance(module, nn.Linear) and hasattr(module, "fp8") and eligible(module) and module is not head:
            module.fp8 = True
            switched += 1
    if device.type == "cpu":
        log(
            f"FP8: {switched} Linears train in FP8, EMULATED on the CPU (torch._scaled_mm needs an FP8 GPU): the "
            "values are quantised to float8 and multiplied in fp32, so the numerics are FP8's and the speed is not"
        )
    else:
        log(f"FP8: {switched} Linears train in FP8 (tensorwise scaling, torch._scaled_mm)")
    return switched


# ----------------------------------------------------------------------------------------------------------
# The pieces


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in `dtype`, inverse scale): x8 = clamp(x * scale) with scale = max_of(dtype) / amax(x), so that
    x ~= x8.float() * inverse_scale. The inverse scale is a 0-dim fp32 tensor."""
    limit = E4M3_MAX if dtype == E4M3 else E5M2_MAX
    amax = x.detach().abs().max().float()
    scale = (limit / amax.double().clamp(min=1e-12)).float()
    quantized = (x.float() * scale).clamp(-limit, limit).to(dtype)
    return quantized, scale.reciprocal()


def scaled_matmul(a: torch.Tensor, a_inverse: torch.Tensor, b: torch.Tensor, b_inverse: torch.Tensor,
                  out_dtype: torch.dtype, *, fast_accumulation: bool) -> torch.Tensor:  # fmt: skip
    """(a @ b) * a_inverse * b_inverse for FP8 a (M, K) and b (K, N), in out_dtype. On CUDA a must be row-major and b
    column-major (what torch._scaled_mm requires); elsewhere it is emulated in fp32. (enable_fp8 has refused CUDA
    devices without FP8 tensor cores, so no capability query runs here, inside compiled code.)"""
    if a.is_cuda:
        return torch._scaled_mm(a, b, scale_a=a_inverse, scale_b=b_inverse, out_dtype=out_dtype,
                                use_fast_accum=fast_accumulation)  # fmt: skip
    return ((a.float() @ b.float()) * (a_inverse * b_inverse)).to(out_dtype)


def column_major(x: torch.Tensor) -> torch.Tensor:
    """The same matrix, laid out column by column (strides (1, rows))."""
    return x.t().contiguous().t()


class _Float8Matmul(torch.autograd.Function):
    """y = x @ W^T with x (M, K) in the compute dtype and W (N, K) the fp32 master, both quantised to e4m3."""

    @staticmethod
    def forward(ctx, x, weight):
        x8, x_inverse = quantize(x, E4M3)
        w8, w_inverse = quantize(weight, E4M3)
        ctx.save_for_backward(x8, x_inverse, w8, w_inverse)
        ctx.out_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        # Fast accumulation in forward, as the reference does; exact accumulation for the gradients.
        return scaled_matmul(x8, x_inverse, w8.t(), w_inverse, x.dtype, fast_accumulation=True)

    @staticmethod
    def backward(ctx, grad_output):
        x8, x_inverse, w8, w_inverse = ctx.saved_tensors
        g8, g_inverse = quantize(grad_output, E5M2)
        grad_x = scaled_matmul(g8, g_inverse, column_major(w8), w_inverse, ctx.out_dtype, fast_accumulation=False)
        grad_weight = scaled_matmul(g8.t().contiguous(), g_inverse, column_major(x8), x_inverse, torch.float32,
                                    fast_accumulation=False)  # fmt: skip
        return grad_x, grad_weight.to(ctx.weight_dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T through FP8 (see the module docstring); returns (..., N) in x's dtype."""
    flat = x.reshape(-1, x.size(-1))
    return _Float8Matmul.apply(flat, weight).view(*x.shape[:-1], weight.size(0))
