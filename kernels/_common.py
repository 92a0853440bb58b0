"""Shared checks and launch helpers of the mHC Triton kernels.

Every public kernel op validates its inputs here before anything is launched, so a wrong dtype,
device or shape raises a ``ValueError`` naming the argument instead of reading garbage.

Supported: x / y / logits / coefficients / phi / alpha / bias in fp32, bf16 or fp16 (each
kernel upcasts to fp32 right after ``tl.load`` and does all maths in fp32); n from 1 to
``MAX_STREAMS``; any C >= 1 (masked tails). float64 is rejected: the kernels compute in fp32, so
fp64 checks (gradcheck) belong to ``backend="torch"``.
"""

from __future__ import annotations

import os

import torch
import triton

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_STREAMS = 8  # the unrolled n x n loops (extraction, Sinkhorn in registers) are sized for this


def next_pow2(v: int) -> int:
    return triton.next_power_of_2(max(1, int(v)))


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` was defined under ``TRITON_INTERPRET=1`` (it then runs on host memory).
    An autotuned kernel is looked at through its ``Autotuner`` wrapper."""
    while type(kernel).__name__ in ("Autotuner", "Heuristics"):
        kernel = kernel.fn
    return type(kernel).__name__ == "InterpretedFunction"


def interpreting() -> bool:
    """``TRITON_INTERPRET`` is set (read when the kernels are defined, as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def quick_autotune() -> bool:
    """``MHC_AUTOTUNE=quick``: one or two configs per kernel instead of the full search (read when
    the kernels are defined). ``launch/gpu_check.sh`` sets it: its sections, the self-test and
    its training run would otherwise each autotune every key for minutes of its 8."""
    return os.environ.get("MHC_AUTOTUNE", "full") == "quick"


def warp_configs(key_free: dict | None = None) -> list:
    """Autotune configs of the memory-bound kernels whose block sizes the launcher picks: 4 or 8
    warps (Hopper: a [BLOCK_T, NP, BLOCK_C] tile of 2048 fp32 is 8-16 registers a thread at 4-8
    warps, leaving room to overlap loads). Under TRITON_INTERPRET=1 a single config: the
    interpreter cannot run a multi-config autotune (it benchmarks with the GPU timer), and one
    config skips the benchmark. Untuned on hardware: no GPU was available when these were chosen."""
    if interpreting() or quick_autotune():
        return [triton.Config(dict(key_free or {}), num_warps=4)]
    return [triton.Config(dict(key_free or {}), num_warps=w) for w in (4, 8)]


def dot_precision() -> str:
    """``tl.dot`` precision for fp32 operands, following torch's own fp32 matmul setting.

    ``torch.set_float32_matmul_precision("high")`` (or "medium") allows TF32, as the paper's
    phi (Eq 10, tfloat32); the default "highest" keeps IEEE fp32, which matches the torch
    reference to fp32 rounding.
    """
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def check_tensor(name: str, t, dtypes=SUPPORTED_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        hint = " (use backend='torch' for float64)" if t.dtype == torch.float64 else ""
        raise ValueError(f"{name} must have dtype {names} for the Triton kernels, got {t.dtype}{hint}")


def check_devices(kernel, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and one the kernels can run on."""
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        where = ", ".join(f"{k}: {t.device}" for k, t in tensors.items())
        raise ValueError(f"all inputs must be on one device, got {where}")
    device = devices.pop()
    if device.type == "cuda":
        return device
    if device.type == "cpu" and is_interpreted(kernel):
        return device  # the interpreter runs on host memory
    raise ValueError(
        f"the mHC Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
        f"before mhc_kernels is imported), got device {device}"
    )


def check_streams(name: str, x: torch.Tensor) -> tuple[int, int]:
    check_tensor(name, x)
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [..., n, C], got {tuple(x.shape)}")
    n, c = x.shape[-2], x.shape[-1]
    if not 1 <= n <= MAX_STREAMS:
        raise ValueError(f"the Triton kernels support 1 <= n <= {MAX_STREAMS} streams, got n = {n}")
    if c < 1:
        raise ValueError(f"{name} must have C >= 1 features, got shape {tuple(x.shape)}")
    return n, c


def check_shape(name: str, t: torch.Tensor, shape: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(t.shape)}")


def check_t_max(t_max) -> int:
    if isinstance(t_max, bool) or int(t_max) != t_max or int(t_max) < 1:
        raise ValueError(f"t_max must be an integer >= 1, got {t_max!r}")
    return int(t_max)


def num_tokens(lead: torch.Size) -> int:
    t = 1
    for s in lead:
        t *= int(s)
    return t
