"""What a run trains on: its ranks and device (torchrun's process group), its compute dtype, and the numbers the
trainer reports about the hardware -- the device's nominal peak FLOP/s (for MFU) and the peak memory a rank used.

This is the one place that knows about ranks and devices. torch is imported inside the functions: logging asks
is_main_process on every line, and commands that never touch a model must not pay for importing torch.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from picochat.common import PicochatError

if TYPE_CHECKING:
    import torch

# ----------------------------------------------------------------------------------------------------------
# Ranks: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE (and MASTER_ADDR/PORT); a plain run is rank 0 of 1.


def distributed_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment variables, (0, 0, 1) without them."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    return rank, local_rank, world_size


def is_main_process() -> bool:
    return distributed_info()[0] == 0


@dataclass
class Distributed:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def distributed_session(device: str | None = None) -> Iterator[Distributed]:
    """Pick the device, and under torchrun initialise the process group (nccl on CUDA with the device from
    LOCAL_RANK, gloo on CPU); the group is destroyed on the way out, on errors too."""
    import torch
    import torch.distributed as dist

    check_device(device)
    rank, local_rank, world_size = distributed_info()
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    device_type = torch.device(device or autodetect_device()).type
    if device_type == "cuda":
        torch_device = torch.device("cuda", local_rank if launched else torch.device(device or "cuda").index or 0)
        torch.cuda.set_device(torch_device)
    elif launched and world_size > 1 and device_type != "cpu":
        raise PicochatError(f"--device {device_type}: multi-process training runs on cpu (gloo) or cuda (nccl)")
    else:
        torch_device = torch.device(device_type)
    started = False
    if launched and not dist.is_initialized():
        if device_type == "cuda":
            dist.init_process_group("nccl", device_id=torch_device)
        else:
            dist.init_process_group("gloo")
        started = True
    try:
        yield Distributed(rank, local_rank, world_size, torch_device)
        if started and dist.is_initialized() and world_size > 1:
            # Every rank reaches the teardown together: a rank that destroys its group (and exits) while another
            # still has gloo traffic in flight can make that one abort ("terminate called without an active
            # exception"), seen on a loaded 2-core machine. Not on errors: a failed rank must not wait for others.
            dist.barrier()
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def is_distributed() -> bool:
    """True when a process group of more than one rank is running (collectives are needed)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ----------------------------------------------------------------------------------------------------------
# Devices and precision. Precision is explicit (no autocast): weights are fp32 masters and every forward runs in
# one compute dtype chosen here, once per device.

_DTYPE_NAMES = ("bfloat16", "float16", "float32")


def check_device(name: str | None) -> None:
    """A --device value this machine can use (None: the best available), else a one-line error."""
    import torch

    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PicochatError(f"--device {name!r}: expected cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PicochatError(f"--device {name}: this machine has no usable CUDA device (use --device cpu)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PicochatError(f"--device {name}: MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise PicochatError(f"--device {name!r}: expected cpu, cuda, cuda:N or mps")


def autodetect_device() -> str:
    """The best device this machine has: "cuda" > "mps" > "cpu"."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def compute_dtype(device: str | Any) -> Any:
    """The dtype activations are computed in on `device` (a string like "cuda:0" or a torch.device).

    $PICOCHAT_DTYPE (bfloat16 | float16 | float32) wins. Otherwise bfloat16 on CUDA GPUs of compute capability
    8.0 or newer (Ampere+, where bf16 tensor cores are fast and bf16 has fp32's exponent range, so no loss
    scaling is needed), and float32 everywhere else (older GPUs, MPS, CPU).
    """
    import torch

    name = os.environ.get("PICOCHAT_DTYPE", "").strip()
    if name:
        if name not in _DTYPE_NAMES:
            raise PicochatError(f"$PICOCHAT_DTYPE={name!r}: expected one of {', '.join(_DTYPE_NAMES)}")
        return getattr(torch, name)
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        if torch.cuda.get_device_capability(device) >= (8, 0):
            return torch.bfloat16
    return torch.float32


# ----------------------------------------------------------------------------------------------------------
# Peak FLOP/s, for MFU


# Dense bf16 tensor-core peaks (FLOP/s), matched on the lower-cased device name; the more specific names first.
GPU_PEAK_FLOPS = [
    ("gh200", 989e12), ("gb200", 2.5e15), ("b200", 2.25e15), ("h200", 989e12), ("h100 nvl", 835e12),
    ("h100 pcie", 756e12), ("h100", 989e12), ("a100", 312e12), ("l40s", 362e12), ("l4", 121e12),
    ("rtx 5090", 209.5e12), ("rtx 4090", 165.2e12), ("rtx 3090", 71e12), ("mi300x", 1.3074e15),
]  # fmt: skip


# Nominal memory bandwidth (bytes/s) of the GPU's own memory, matched like GPU_PEAK_FLOPS.
GPU_PEAK_BANDWIDTH = [
    ("gh200", 4.0e12), ("gb200", 8.0e12), ("b200", 8.0e12), ("h200", 4.8e12), ("h100 nvl", 3.9e12),
    ("h100 pcie", 2.0e12), ("h100", 3.35e12), ("a100-sxm4-80gb", 2.039e12), ("a100 80gb", 1.935e12),
    ("a100", 1.555e12), ("l40s", 864e9), ("l4", 300e9), ("rtx 5090", 1.792e12), ("rtx 4090", 1.008e12),
    ("rtx 3090", 936e9), ("mi300x", 5.3e12),
]  # fmt: skip


def gpu_peak_bandwidth(device_name: str) -> float | None:
    """The table's memory bandwidth for a GPU name; None when not in the table."""
    name = device_name.lower()
    for pattern, bandwidth in GPU_PEAK_BANDWIDTH:
        if pattern in name:
            return bandwidth
    return None


def cpu_memory_bandwidth(megabytes: int = 256, repeats: int = 3) -> float:
    """A CPU has no nominal figure we can read, so measure one: bytes read + written per second by the best of a few
    copies of a buffer much larger than the caches."""
    import time

    import torch

    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best


def peak_bandwidth(device: torch.device) -> tuple[float | None, str]:
    """(bytes/s, where the figure comes from): the nominal figure of a known GPU, a measured copy rate on CPU."""
    import torch

    if device.type == "cuda":
        return gpu_peak_bandwidth(torch.cuda.get_device_name(device)), "nominal (hardware.GPU_PEAK_BANDWIDTH)"
    if device.type == "cpu":
        return cpu_memory_bandwidth(), "measured (a 256 MiB copy, best of 3)"
    return None, "unknown"


def cpu_peak_flops(threads: int | None = None) -> tuple[float, str]:
    """Nominal fp32 peak of the CPU threads torch uses: threads x clock x FLOPs per cycle, from /proc/cpuinfo.

    FLOPs per cycle assume two FMA units per core: AVX-512 2 x 16 lanes x 2 = 64, AVX2+FMA 32, AVX 16, else 8.
    This is an optimistic ceiling (many cores have one 512-bit unit or clock down under AVX-512); bench/train.py
    reports it next to a fp32 matmul throughput it measures on the machine, which is the honest yardstick."""
    import torch

    threads = threads or torch.get_num_threads()
    flags, clock_hz = set(), 3e9  # (3 GHz when the clock cannot be read, e.g. not Linux)
    with contextlib.suppress(OSError, ValueError):
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines())
        info = {key.strip(): value.strip() for key, value in info.items()}
        flags, clock_hz = set(info.get("flags", "").split()), float(info.get("cpu MHz", 3000)) * 1e6
        clock_hz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) * 1e3
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16 if "avx" in flags else 8
    described = f"{threads} threads x {clock_hz / 1e9:.2f} GHz x {per_cycle} fp32 FLOPs/cycle (nominal)"
    return threads * clock_hz * per_cycle, described


def gpu_peak_flops(device_name: str) -> float | None:
    """The table's peak for a GPU name such as "NVIDIA H100 80GB HBM3"; None when not in the table."""
    name = device_name.lower()
    for pattern, flops in GPU_PEAK_FLOPS:
        if pattern in name:
            return flops
    return None


def peak_flops(device: torch.device) -> float | None:
    """Nominal peak FLOP/s of one rank's device; None when unknown (MFU is then not reported)."""
    import torch

    if device.type == "cpu":
        return cpu_peak_flops()[0]
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """High-water mark: allocated GPU memory on CUDA, the process's resident set (RSS) on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
