"""Process-level tuning and device selection for CPU/GPU work.

`tune_process` is called once, at the start of a worker or benchmark process, before any
large tensor is allocated. On glibc it stops malloc from handing big blocks back to the
kernel after every free (mmap + munmap per conv output), which made PyTorch 2-4x faster on
small CPU machines; elsewhere it is a no-op.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .malloc import keep_freed_memory


def cpu_count() -> int:
    """Cores this process may use (respects taskset / cgroup cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def tune_process(threads: int = 0) -> bool:
    """Tune glibc malloc and set torch's thread count (0 = one per core).

    Returns True when the malloc tuning was applied (glibc found), False otherwise.
    """
    torch.set_num_threads(threads if threads > 0 else cpu_count())
    return keep_freed_memory()


def resolve_device(device: str = "cpu") -> torch.device:
    """'auto' -> first CUDA GPU if any, else CPU; 'cuda'/'cuda:N' must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s)")
    return dev


def use_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast pays off: 2-3x faster than float32 for EfficientNet-Lite0 on CPUs with
    native bf16 (AVX512-BF16, AMX; measured on Zen 4) and on recent GPUs; same accuracy on photos.

    On CUDA only for native bf16 (compute capability 8.0 and up: Ampere, Hopper, ...) of that very
    device: torch.cuda.is_bf16_supported() also says yes for older cards that emulate it (slower
    than float32), and asks about the current device rather than this one."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextlib.contextmanager
def torch_threads(n: int):
    """Temporarily run torch ops on n threads. Small problems (the linear head: ~1000 x 2560)
    are fastest on one: OpenMP barriers between 2 threads cost more than the work, and up to
    10x more when another process holds the other core (measured on a shared 2-vCPU VM)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
