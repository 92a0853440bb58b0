"""DeepSeekMoE: fine-grained routed experts plus shared experts, aux-loss-free balancing.

Routing (DeepSeek-V3 section 2.1.2): sigmoid affinities s = sigmoid(x W_r^T); the top-k experts
are chosen on s + b, where b is a per-expert bias that no gradient touches; the gate weights
come from the unbiased s of the chosen experts, normalised over them and scaled by
``route_scale``. After every optimizer step ``update_bias`` nudges b by ``speed`` toward
balance: up for under-loaded experts, down for over-loaded ones. An optional sequence-wise
balance loss (DeepSeek-V3 Eq 17-20) is kept in ``aux_loss``.

The layer runs as three steps: ``dispatcher.dispatch`` groups the (token, expert) rows by expert,
``experts`` runs them (grouped GEMM, cumulative offsets on the device), ``dispatcher.combine``
weights and sums them back per token. Dropless (no capacity factor) and, without expert
parallelism, free of device-to-host syncs in forward and backward.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mhc_train.model.config import ModelConfig
from mhc_train.model.ffn import SwiGLU
from mhc_train.weight_casts import cast_weight


class _Recomputing(threading.local):
    active = False


_recomputing = _Recomputing()


@contextlib.contextmanager
def recomputed_forward():
    """Marks a forward that activation checkpointing re-runs in backward
    (``mhc_train.train.activation_checkpoint``): its side effects belong to the original forward.
    Inside, routers do not add to ``expert_load`` (the bias update and the imbalance metric would
    count every token twice) and MoE leaves ``aux_loss`` alone (a pipeline stage reads it after
    each forward). Thread-local: a DualPipeV pair recomputes in one thread while the other runs a
    forward."""
    previous = _recomputing.active
    _recomputing.active = True
    try:
        yield
    finally:
        _recomputing.active = previous


def count_per_expert(flat_expert: torch.Tensor, n_experts: int) -> torch.Tensor:
    """int64 [n_experts]: how many entries of ``flat_expert`` name each expert. A scatter of ones,
    not ``bincount``, which reads the maximum back to the host on CUDA."""
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat_expert.device)
    return counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert, dtype=torch.int64))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.n_activated_experts
        self.n_experts = cfg.n_routed_experts
        self.route_scale = cfg.route_scale
        self.norm_topk_prob = cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # Persistent: the balancing bias is training state and goes into checkpoints.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts))
        # Tokens routed to each expert since the last bias update (not checkpointed).
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, C] -> gate weights [T, k] (fp32), expert indices [T, k], scores [T, E] (fp32)."""
        with torch.autocast(x.device.type, enabled=False):  # routing in fp32 (autocast would run it in bf16)
            scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        indices = torch.topk(scores + self.expert_bias, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(-1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.route_scale
        if self.training and not _recomputing.active:
            with torch.no_grad():
                self.expert_load += count_per_expert(indices.flatten(), self.n_experts)
        return weights, indices, scores

    @torch.no_grad()
    def update_bias(self, speed: float, group: dist.ProcessGroup | None = None) -> None:
        """One aux-loss-free balancing step from the loads seen since the previous call."""
        load = self.expert_load
        if group is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(load, group=group)
        if load.sum() > 0:
            self.expert_bias += speed * torch.sign(load.mean() - load)
        load.zero_()


@dataclass
class SortedTokens:
    """One process's (token, expert) pairs, sorted by expert (stable)."""

    tokens: torch.Tensor  # [T*k, C] rows of x in expert order
    counts: torch.Tensor  # [E] int64 rows per expert, on the device
    order: torch.Tensor  # [T*k] position of each sorted row in the flattened [T, k] pairs
    token_of: torch.Tensor  # [T*k] source token of each sorted row (order // k)
    num_tokens: int


def sort_by_expert(x: torch.Tensor, indices: torch.Tensor, n_experts: int) -> SortedTokens:
    """x [T, C], indices [T, k] -> the T*k rows of x grouped by expert, without a host sync."""
    flat_expert = indices.flatten()
    order = torch.argsort(flat_expert, stable=True)
    token_of = order // indices.shape[1]
    tokens = x.index_select(0, token_of)  # its backward is an index_add_
    return SortedTokens(tokens, count_per_expert(flat_expert, n_experts), order, token_of, x.shape[0])


def combine_sorted(y_sorted: torch.Tensor, weights: torch.Tensor, sorted_: SortedTokens,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """Expert outputs [T*k, C] in expert order -> [T, C]: each row times its gate weight, summed
    per token in ``out_dtype`` (x's dtype: under autocast the experts return bf16 while x is fp32)."""
    gate = weights.flatten().index_select(0, sorted_.order).unsqueeze(-1).to(y_sorted.dtype)
    y = (y_sorted * gate).to(out_dtype)
    return y.new_zeros(sorted_.num_tokens, y.shape[-1]).index_add_(0, sorted_.token_of, y)


class LocalDispatcher:
    """Every routed expert lives in this process: dispatch is a sort by expert, combine its inverse.
    Expert parallelism replaces ``MoE.dispatcher`` with one that exchanges rows between ranks."""

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor,
                 n_experts: int) -> tuple[torch.Tensor, torch.Tensor, SortedTokens]:
        """x [T, C], indices [T, k] -> rows grouped by expert [T*k, C], offsets [E] int32 (cumulative
        row ends, on the device), and the context that ``combine`` needs."""
        sorted_ = sort_by_expert(x, indices, n_experts)
        return sorted_.tokens, sorted_.counts.cumsum(0).to(torch.int32), sorted_

    def combine(self, y: torch.Tensor, weights: torch.Tensor, ctx: SortedTokens) -> torch.Tensor:
        return combine_sorted(y, weights, ctx, ctx.tokens.dtype)


def grouped_mm_supported(x: torch.Tensor, w1: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs the experts of x [N, C] and w1 [E, F, C] without a host
    sync. CPU takes fp32 / bf16 / fp16; on CUDA only the bf16 kernel of sm90 / sm100 avoids the
    fallback, which copies the offsets to the host per call (aten GroupedMMUtils.h). Every operand's
    row stride must be a multiple of 16 bytes. Under torch.compile (``train.compile``) a host sync
    inside the op beats the loop's, which would break the graph: bf16 takes the fallback on any
    CUDA GPU, and ``grouped_mm`` stands in for the meta kernel, which accepts only bf16."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        kernel = dtype in (torch.float32, torch.bfloat16, torch.float16)
    elif x.device.type == "cuda" and torch.version.hip is None:
        fast = torch.compiler.is_compiling() or torch.cuda.get_device_capability(x.device)[0] in (9, 10)
        kernel = dtype == torch.bfloat16 and fast
    else:
        kernel = False
    return kernel and all(d * dtype.itemsize % 16 == 0 for d in w1.shape[1:])


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(a, b, offs=offs)``; under torch.compile in another dtype than bf16 the same
    kernel behind an opaque op (``mhc_train::grouped_mm``): the meta kernel that tracing needs
    refuses every dtype but bf16, and the per-expert loop would read the counts on the host (a
    graph break). Eager calls the kernel directly."""
    if torch.compiler.is_compiling() and a.dtype != torch.bfloat16:
        return _opaque_grouped_mm(a, b, offs)
    return torch._grouped_mm(a, b, offs=offs)


@torch.library.custom_op("mhc_train::grouped_mm", mutates_args=())
def _opaque_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


@_opaque_grouped_mm.register_fake
def _(a, b, offs):
    if b.dim() == 3:  # a [N, K] rows grouped by offs, b [E, K, F] -> [N, F]
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[-1])  # a [K, N], b [N, F] split along N -> [E, K, F]


def _grouped_mm_backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad_a = grad_b = None
    if b.dim() != 3:
        raise NotImplementedError("mhc_train::grouped_mm: gradient of the 2d x 2d form")
    if ctx.needs_input_grad[0]:  # per group: grad_a = grad b[e]^T
        grad_a = _opaque_grouped_mm(grad, b.transpose(-2, -1), offs)
    if ctx.needs_input_grad[1]:  # per group: grad_b[e] = a_e^T grad_e
        grad_b = _opaque_grouped_mm(a.t(), grad, offs)
    return grad_a, grad_b, None


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


_opaque_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights, run on rows already grouped by expert: one grouped
    GEMM per projection (``impl`` grouped), or one matmul per expert (``impl`` loop: needs the row
    counts on the host; the fallback and the reference). ``auto`` takes grouped where supported."""

    IMPLS = ("auto", "grouped", "loop")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, c, f = cfg.n_routed_experts, cfg.dim, cfg.moe_ffn_dim
        self.w1 = nn.Parameter(torch.empty(e, f, c))  # gate
        self.w3 = nn.Parameter(torch.empty(e, f, c))  # up
        self.w2 = nn.Parameter(torch.empty(e, c, f))  # down
        self.impl = "auto"
        # Expert parallelism (mhc_train.parallel.expert_parallel) shards the weights as DTensors
        # and sets 1 / ep: an expert's gradient sums the rows of its whole EP group, while the
        # data-parallel average happens over the copies of the expert only.
        self.grad_scale = 1.0

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w3, w2) of the experts held by this process; every code path takes them from here."""
        weights = tuple(w.to_local() if hasattr(w, "to_local") else w for w in (self.w1, self.w3, self.w2))
        if self.grad_scale != 1.0:
            weights = tuple(_ScaleGrad.apply(w, self.grad_scale) for w in weights)
        return weights

    def forward(self, x_grouped: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x_grouped [N, C] rows grouped by local expert, offsets [E_local] int32 cumulative row
        ends (offsets[-1] == N) -> expert outputs [N, C] in the same order."""
        if self.impl not in self.IMPLS:
            raise ValueError(f"RoutedExperts.impl must be one of {self.IMPLS}, got {self.impl!r}")
        w1, w3, w2 = self.local_weights()
        if self.impl == "grouped" or (self.impl == "auto" and grouped_mm_supported(x_grouped, w1)):
            return self._grouped(x_grouped, offsets, w1, w3, w2)
        return self._loop(x_grouped, offsets, w1, w3, w2)

    @staticmethod
    def _grouped(x, offsets, w1, w3, w2) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # _grouped_mm is no autocast op: cast as F.linear would
            dtype = torch.get_autocast_dtype(x.device.type)
            x = x.to(dtype)
            w1, w3, w2 = (cast_weight(w, dtype) for w in (w1, w3, w2))  # once per step (weight_casts)
        hidden = F.silu(grouped_mm(x, w1.transpose(-2, -1), offsets))
        hidden = hidden * grouped_mm(x, w3.transpose(-2, -1), offsets)
        return grouped_mm(hidden, w2.transpose(-2, -1), offsets)

    @staticmethod
    def _loop(x, offsets, w1, w3, w2) -> torch.Tensor:
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()  # the host sync
        outputs = []
        # unbind, not w[e]: each w[e]'s backward would write a zero gradient of all E experts.
        # Empty chunks run too: the output then stays in the graph even with no rows at all.
        for chunk, g, u, d in zip(torch.split(x, counts), w1.unbind(), w3.unbind(), w2.unbind()):
            outputs.append(F.linear(F.silu(F.linear(chunk, g)) * F.linear(chunk, u), d))
        return torch.cat(outputs)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = RoutedExperts(cfg)
        self.shared = SwiGLU(cfg.dim, cfg.n_shared_experts * cfg.moe_ffn_dim) if cfg.n_shared_experts else None
        self.aux_loss: torch.Tensor | None = None
        # A plain attribute, not a submodule: expert parallelism swaps it for its own from outside.
        self.dispatcher = LocalDispatcher()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        weights, indices, scores = self.router(tokens)
        x_grouped, offsets, ctx = self.dispatcher.dispatch(tokens, indices, self.cfg.n_routed_experts)
        out = self.dispatcher.combine(self.experts(x_grouped, offsets), weights, ctx)
        if self.shared is not None:
            out = out + self.shared(tokens)
        aux_loss = self._sequence_balance_loss(scores, indices, shape) if self.training else None
        if not _recomputing.active:  # computed all the same: a checkpoint replays every op of the forward
            self.aux_loss = aux_loss
        return out.view(shape)

    def _sequence_balance_loss(self, scores: torch.Tensor, indices: torch.Tensor, shape) -> torch.Tensor | None:
        """DeepSeek-V3 Eq 17-20, per sequence: alpha * sum_i f_i P_i, averaged over the batch."""
        coef = self.cfg.seq_aux_loss_coef
        if coef <= 0:
            return None
        b, s = shape[0], shape[1] if len(shape) == 3 else 1
        e, k = self.cfg.n_routed_experts, self.cfg.n_activated_experts
        chosen = torch.zeros_like(scores).scatter_(-1, indices, 1.0).view(b, s, e)
        f = chosen.sum(dim=1) * (e / (k * s))  # [B, E]
        p = (scores / scores.sum(dim=-1, keepdim=True)).view(b, s, e).mean(dim=1)  # [B, E]
        return coef * (f * p).sum(dim=-1).mean()
