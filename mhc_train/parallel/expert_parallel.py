"""Expert parallelism: the routed experts of every MoE layer sharded over the ``ep`` mesh dimension.

Each EP rank holds E / ep consecutive experts (``w1/w3/w2`` become DTensors ``Shard(0)`` on the
ep mesh, so checkpoints hold the global tensors and reshard between ep sizes). One MoE step:

    route (every rank, its own tokens)
    sort_by_expert                         (token, expert) pairs in global expert order, which is
                                           destination-rank order (experts are contiguous per rank)
    all_to_all_single(counts)              each rank learns how many rows it receives per local expert
    .tolist()                              the one device-to-host sync: all-to-all split sizes
    all-to-all of the rows (async)         dispatch; received rows ordered (source rank, local expert)
    regroup to (local expert, source)      -> grouped GEMM over the local experts (RoutedExperts)
    inverse regroup, all-to-all back       combine; then gate weights and the sum per token, as locally

The result equals one process (the same rows meet the same weights; only the order in which a
token's k expert outputs are summed is fixed by its slots, as locally). Gradients: an expert's
weight gradient sums the rows of every rank of its EP group; the data-parallel average over the
D data ranks then needs a factor 1/ep on top of FSDP's average over the D / ep copies of the
expert (``RoutedExperts.grad_scale``).

Shared experts, attention, router and connections stay data-parallel.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from mhc_train.model.moe import MoE, RoutedExperts, SortedTokens, combine_sorted, sort_by_expert
from mhc_train.parallel.phases import wait_overlapped

EXPERT_WEIGHTS = ("w1", "w3", "w2")


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with autograd, issued asynchronously and waited for through
    ``wait_overlapped`` in forward and in backward: in a DualPipe-style overlapped pair the other
    chunk computes while the rows travel."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, label):
        ctx.splits, ctx.group, ctx.label = (output_splits, input_splits), group, label
        return _exchange(x, output_splits, input_splits, group, f"{label}")

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _exchange(grad, input_splits, output_splits, ctx.group, f"{ctx.label}.backward"), None, None, None, None


def _exchange(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group, label: str) -> torch.Tensor:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group, async_op=True)
    wait_overlapped(work, label)
    return out


class ExpertParallelDispatcher:
    """Drop-in for ``LocalDispatcher``: tokens to the EP ranks that own their experts and back."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int) -> None:
        self.group = group
        self.ep = dist.get_world_size(group)
        if n_experts % self.ep:
            raise ValueError(f"{n_experts} experts do not split over {self.ep} expert-parallel ranks")
        self.n_local = n_experts // self.ep

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, n_experts: int):
        sorted_ = sort_by_expert(x, indices, n_experts)
        ep, n_local = self.ep, self.n_local
        recv_counts = torch.empty_like(sorted_.counts)  # [source rank, local expert]
        dist.all_to_all_single(recv_counts, sorted_.counts, group=self.group)
        send, recv = torch.cat([sorted_.counts, recv_counts]).view(2, ep, n_local).sum(-1).tolist()
        tokens = sorted_.tokens
        if torch.is_autocast_enabled(x.device.type):  # the experts compute in bf16 anyway: send half the bytes
            tokens = tokens.to(torch.get_autocast_dtype(x.device.type))
        received = _AllToAll.apply(tokens, recv, send, self.group, "dispatch")
        # (source, local expert) -> (local expert, source): one stable sort of the rows' expert ids
        local_expert = torch.arange(n_local, device=x.device).repeat(ep)
        expert_of_row = torch.repeat_interleave(local_expert, recv_counts, output_size=received.shape[0])
        regroup = torch.argsort(expert_of_row, stable=True)
        offsets = recv_counts.view(ep, n_local).sum(0).cumsum(0).to(torch.int32)
        return received[regroup], offsets, (sorted_, regroup, send, recv)

    def combine(self, y: torch.Tensor, weights: torch.Tensor, ctx) -> torch.Tensor:
        sorted_, regroup, send, recv = ctx
        sorted_: SortedTokens
        inverse = torch.empty_like(regroup)
        inverse[regroup] = torch.arange(regroup.numel(), device=regroup.device)
        returned = _AllToAll.apply(y[inverse], send, recv, self.group, "combine")
        return combine_sorted(returned, weights, sorted_, sorted_.tokens.dtype)


def _shard_rows(param: nn.Parameter, mesh) -> nn.Parameter:
    """A Shard(0) DTensor on ``mesh`` from a full parameter (its local rows are copied) or a meta
    one (the local shard stays meta: it is materialised later, its rows initialised by index)."""
    from torch.distributed.tensor import DTensor, Shard

    size, rank = mesh.size(), mesh.get_local_rank()
    rows = param.shape[0] // size
    local = param.detach()[rank * rows:(rank + 1) * rows]
    local = local if local.is_meta else local.clone()
    dtensor = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=param.shape, stride=param.stride())
    return nn.Parameter(dtensor, requires_grad=param.requires_grad)


def apply_expert_parallel(moes: list[MoE], ep_mesh) -> None:
    """Shard the routed experts of ``moes`` over ``ep_mesh`` (before materialisation or after)
    and route their tokens through all-to-all."""
    group, ep = ep_mesh.get_group(), ep_mesh.size()
    for moe in moes:
        experts = moe.experts
        for name in EXPERT_WEIGHTS:
            setattr(experts, name, _shard_rows(getattr(experts, name), ep_mesh))
        experts.grad_scale = 1.0 / ep
        moe.dispatcher = ExpertParallelDispatcher(group, moe.cfg.n_routed_experts)


def expert_modules(module: nn.Module) -> list[RoutedExperts]:
    return [m for m in module.modules() if isinstance(m, RoutedExperts)]


def expert_parameters(experts: RoutedExperts) -> set[nn.Parameter]:
    return {getattr(experts, name) for name in EXPERT_WEIGHTS}


def is_expert_parallel(experts: RoutedExperts) -> bool:
    """Whether ``apply_expert_parallel`` sharded these experts over an EP mesh."""
    from torch.distributed.tensor import DTensor

    return isinstance(experts.w1, DTensor)


__all__ = ["ExpertParallelDispatcher", "apply_expert_parallel", "expert_modules", "expert_parameters",
           "is_expert_parallel"]
