"""Process groups: set-up from torchrun's environment, rank helpers, teardown.

    torchrun ... -m mhc_train.train parallel=ddp      RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
      -> init_distributed()   env:// rendezvous; NCCL on CUDA (one device per LOCAL_RANK), gloo on CPU
      -> ... training ...
      -> destroy_distributed()

Without ``WORLD_SIZE`` (a plain ``python -m mhc_train.train``) nothing is initialised and the
helpers answer rank 0 of 1, so single-process code never branches on whether a group exists.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator

import torch
import torch.distributed as dist


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def default_backend(device_type: str | None = None) -> str:
    """NCCL when the processes train on CUDA devices, gloo otherwise (CPU, tests)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return "nccl" if device_type == "cuda" and dist.is_nccl_available() else "gloo"


def init_distributed(backend: str | None = None, device_type: str | None = None,
                     timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun describes in the environment (env:// rendezvous).

    Returns True when this call created the group (the caller then destroys it), False when there
    is nothing to do (one process, or a group already set up by the caller). On CUDA the process
    binds to ``cuda:LOCAL_RANK`` first, so NCCL's communicator uses the right device.
    """
    if is_initialized() or "WORLD_SIZE" not in os.environ:  # not launched by torchrun
        return False
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    backend = backend or default_backend(device_type)
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(env_local_rank())
        kwargs["device_id"] = torch.device("cuda", env_local_rank())
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return True


def destroy_distributed() -> None:
    if is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(backend: str | None = None, device_type: str | None = None,
                timeout_s: float = 1800.0) -> Iterator[bool]:
    """``init_distributed`` ... ``destroy_distributed`` (only when this context created the group)."""
    created = init_distributed(backend, device_type, timeout_s)
    try:
        yield created
    finally:
        if created:
            destroy_distributed()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean over the ranks of the group (the tensor itself without a group)."""
    if not is_initialized():
        return values
    out = values.clone()
    dist.all_reduce(out, group=group)
    return out / dist.get_world_size(group)


def all_reduce_sum_(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(values, group=group)
    return values
