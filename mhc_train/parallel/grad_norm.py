"""The global gradient norm, and clipping by it, when the gradients are spread over a mesh.

Under pipeline x data x expert parallelism a rank holds some parameters (its pipeline stages),
of those some as shards (FSDP2 over the data ranks, experts over EP) and some as copies that
other data ranks hold too (HSDP's replicate dimension, or no data sharding at all). The norm of
the whole model's gradient is then one all-reduce of

    sum over this rank's parameters of  |local gradient|^2 / (data ranks holding the same values)

because every shard of every parameter is held by exactly that many ranks of the world. torch's
``clip_grad_norm_`` cannot do this: it stacks the per-parameter norms, which fails for DTensors
on different meshes (experts on the EP mesh, the rest on the data mesh) and double-counts copies.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _distinct_shards(t: torch.Tensor) -> int:
    """How many different pieces ``t``'s values are split into across its mesh (1: a plain tensor)."""
    placements = getattr(t, "placements", None)
    if placements is None:
        return 1
    # every placement but Replicate splits the values (Shard, and FSDP's _StridedShard over an EP
    # shard, whose is_shard() is False); a gradient is never Partial after its reduction
    return math.prod(t.device_mesh.size(i) for i, p in enumerate(placements) if not p.is_replicate())


def global_grad_norm(params, data_ranks: int = 1, group: dist.ProcessGroup | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
    """The 2-norm of the gradient of every parameter of the model, on every rank (fp32).

    ``data_ranks``: how many data-parallel ranks share each pipeline stage (a plain-tensor
    parameter is held by all of them); ``group``: the ranks to sum over (default: the world;
    None without torch.distributed)."""
    squares = []
    for p in params:
        if p.grad is None:
            continue
        copies = data_ranks // _distinct_shards(p.grad)
        squares.append(_local(p.grad).detach().float().pow(2).sum() / copies)
    if device is None:
        device = squares[0].device if squares else torch.device("cpu")
    total = torch.stack(squares).sum().reshape(1) if squares else torch.zeros(1, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return total.sqrt().reshape(())


@torch.no_grad()
def clip_grads_(params, max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale every gradient by max_norm / total_norm when that is below 1 (as ``clip_grad_norm_``)."""
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].device))
