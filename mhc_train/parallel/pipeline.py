"""Pipeline parallelism on ``torch.distributed.pipelining``: stage splitting and schedules.

    model (full, or the same init on every rank)
      -> stage_blocks:  contiguous blocks per stage, balanced by a cost estimate or given
      -> PipelineStageModule per local stage (the model's own modules, global names kept)
      -> torch PipelineStage (static shapes) -> schedule by name (gpipe ... dualpipev)
      -> DualPipeV: OVERLAP_F_B handler (mhc_train.parallel.overlap)

Every stage boundary carries streams ``[b, S, n, C]`` (n = 1 for the baseline): the first stage
maps tokens to streams, the last maps streams to logits and the schedule's ``loss_fn`` turns
those into the loss. Residual recomputation restarts at each stage's first sublayer, so a
recompute block never crosses a stage and its input x_l0 is the stage's own input.

The model never imports this package: the stage module borrows the model's methods
(``embed_streams``, ``head_logits``, ``rope``, ``recompute_plan``) instead of copying them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from mhc_train.model.moe import RoutedExperts
from mhc_train.model.transformer import MHCTransformer
from mhc_train.parallel.overlap import OverlapFBHandler, post_res_regions

SCHEDULE_CLASSES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved1f1b": ScheduleInterleaved1F1B,
    "zbv": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}
SCHEDULES = tuple(SCHEDULE_CLASSES)
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")  # one stage per rank
V_SCHEDULES = ("zbv", "dualpipev")  # two stages per rank in a V: rank 0 holds the first and the last


class PipelineConfigError(ValueError):
    """An impossible pipeline setup, named by its ``parallel.pipeline.<key>``."""


def _bad(key: str, reason: str):
    raise PipelineConfigError(f"parallel.pipeline.{key}: {reason}")


@dataclass
class PipelineConfig:
    """What a run chooses (the trainer's ``parallel.pipeline`` group)."""

    schedule: str = "1f1b"
    microbatches: int = 4  # per optimizer step; the batch is split evenly into them
    stages_per_rank: int | None = None  # None: 1 (gpipe, 1f1b) or 2 (interleaved1f1b, zbv, dualpipev)
    stage_blocks: list[int] | None = None  # blocks per stage (in stage order); None: balanced by cost
    balance: str = "stage"  # stage: the costliest stage as cheap as possible | rank: the costliest rank (V only)
    overlap: bool = True  # dualpipev: run paired F and B chunks through the overlap handler
    overlap_concurrency: str = "auto"  # auto (threads + streams on CUDA, sequential on CPU) | sequential | threads
    post_res_stream: bool = False  # CUDA: FFN post-res merge on a high-priority stream (paper 4.3.3)


# ------------------------------------------------------------------------- constraints


def normalize_schedule_name(name: str) -> str:
    key = str(name).lower().replace("-", "").replace("_", "")
    aliases = {"interleaved": "interleaved1f1b", "zbvzerobubble": "zbv", "zerobubblev": "zbv"}
    key = aliases.get(key, key)
    if key not in SCHEDULE_CLASSES:
        _bad("schedule", f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return key


def resolve_stages_per_rank(schedule: str, stages_per_rank: int | None) -> int:
    schedule = normalize_schedule_name(schedule)
    if stages_per_rank is None:
        return 1 if schedule in SINGLE_STAGE_SCHEDULES else 2
    if not isinstance(stages_per_rank, int) or isinstance(stages_per_rank, bool) or stages_per_rank < 1:
        _bad("stages_per_rank", f"must be an integer >= 1, got {stages_per_rank!r}")
    if schedule in SINGLE_STAGE_SCHEDULES and stages_per_rank != 1:
        _bad("stages_per_rank", f"{schedule} runs exactly 1 stage per rank, got {stages_per_rank} "
             "(use interleaved1f1b for several stages per rank)")
    if schedule in V_SCHEDULES and stages_per_rank != 2:
        _bad("stages_per_rank", f"{schedule} needs exactly 2 stages per rank (a V: rank 0 holds the first "
             f"and the last stage), got {stages_per_rank}")
    if schedule == "interleaved1f1b" and stages_per_rank < 2:
        _bad("stages_per_rank", "interleaved1f1b needs at least 2 stages per rank (with 1 it is 1f1b)")
    return stages_per_rank


def validate_pipeline(
    schedule: str,
    world_size: int,
    n_layers: int,
    n_microbatches: int,
    stages_per_rank: int | None = None,
    stage_blocks: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> tuple[str, int]:
    """Check a pipeline setup before anything is built; returns (schedule, stages_per_rank).

    Pre-empts what torch's schedules enforce (and what would otherwise fail deep inside a step)
    with one message naming the key: stages per rank of each schedule, every stage holding at
    least one block, micro-batch counts (1F1B and DualPipeV: >= stages; interleaved: a multiple of
    its rounds max(1, microbatches // ranks); see ``docs/pipeline.md``), and a batch that
    splits evenly into the micro-batches (every boundary tensor has one static shape).
    """
    schedule = normalize_schedule_name(schedule)
    if not isinstance(world_size, int) or world_size < 1:
        _bad("world_size", f"pipeline ranks must be >= 1, got {world_size!r}")
    spr = resolve_stages_per_rank(schedule, stages_per_rank)
    num_stages = world_size * spr
    if not isinstance(n_microbatches, int) or isinstance(n_microbatches, bool) or n_microbatches < 1:
        _bad("microbatches", f"must be an integer >= 1, got {n_microbatches!r}")
    if n_layers < num_stages:
        _bad("stages_per_rank", f"{num_stages} stages ({world_size} ranks x {spr}) need at least one block each, "
             f"but the model has {n_layers} blocks (model.n_layers)")
    if schedule == "1f1b" and n_microbatches < num_stages:
        _bad("microbatches", f"1f1b needs at least as many micro-batches as stages: {n_microbatches} < {num_stages}")
    if schedule == "dualpipev" and n_microbatches < num_stages:
        _bad("microbatches", f"dualpipev needs at least as many micro-batches as stages "
             f"(2 x {world_size} ranks = {num_stages}), got {n_microbatches}")
    if schedule == "interleaved1f1b":
        rounds = max(1, n_microbatches // world_size)
        if n_microbatches % rounds:
            _bad("microbatches", f"interleaved1f1b needs the micro-batches ({n_microbatches}) to be a multiple of "
                 f"its rounds max(1, microbatches // ranks) = {rounds}; e.g. use a multiple of {world_size}")
    if stage_blocks is not None:
        check_stage_blocks(stage_blocks, num_stages, n_layers)
    if batch_size is not None and (batch_size < n_microbatches or batch_size % n_microbatches):
        _bad("microbatches", f"the batch of {batch_size} sequences must split evenly into {n_microbatches} "
             "micro-batches (pipeline boundaries have one static shape)")
    return schedule, spr


def check_stage_blocks(stage_blocks: Sequence[int], num_stages: int, n_layers: int) -> list[int]:
    counts = list(stage_blocks)
    if len(counts) != num_stages:
        _bad("stage_blocks", f"gives {len(counts)} stages, the schedule has {num_stages}")
    if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in counts):
        _bad("stage_blocks", f"every stage needs an integer number of blocks >= 1, got {counts}")
    if sum(counts) != n_layers:
        _bad("stage_blocks", f"blocks per stage {counts} sum to {sum(counts)}, the model has {n_layers}")
    return counts


def stage_to_rank(schedule: str, world_size: int, stages_per_rank: int) -> dict[int, int]:
    """Global stage index -> pipeline rank: looped (stage s on rank s % P) or V-shaped."""
    schedule = normalize_schedule_name(schedule)
    num_stages = world_size * stages_per_rank
    if schedule in V_SCHEDULES:
        # V: down on stages 0..P-1, back up on P..2P-1, so rank 0 holds stage 0 and stage 2P-1.
        return {s: (s if s < world_size else 2 * world_size - 1 - s) for s in range(num_stages)}
    return {s: s % world_size for s in range(num_stages)}


def local_stages(schedule: str, rank: int, world_size: int, stages_per_rank: int) -> list[int]:
    mapping = stage_to_rank(schedule, world_size, stages_per_rank)
    return sorted(s for s, r in mapping.items() if r == rank)


# ------------------------------------------------------------------------ stage costs


def block_cost(block: nn.Module, attention_context: float = 0.0) -> float:
    """Multiply-adds per token of one block: its matmul weights, routed experts at top-k / E,
    plus the attention score/value work against ``attention_context`` keys (0: ignored)."""
    cost = 0.0
    for module in block.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, RoutedExperts):
            parent_router = getattr(getattr(block, "ffn", None), "router", None)
            k = parent_router.top_k if parent_router is not None else 1
            e = module.w1.shape[0]
            own = own * k / e
        cost += own
    attn = getattr(block, "attn", None)
    if attention_context and attn is not None:
        cfg = attn.cfg if hasattr(attn, "cfg") else None
        if cfg is not None:
            cost += cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * attention_context
    return float(cost)


def model_costs(model: MHCTransformer, seq_len: int | None = None) -> tuple[list[float], float, float]:
    """(per-block costs, extra cost of the first stage, extra cost of the last stage).

    Per token: blocks as ``block_cost`` (average causal context seq_len / 2 when given); the
    embedding is a lookup (counted as C, its read); the head is a C x V matmul plus the final
    norm and the loss."""
    context = seq_len / 2 if seq_len else 0.0
    costs = [block_cost(b, context) for b in model.blocks]
    first = float(model.cfg.dim)
    last = float(model.head.weight.numel() + model.cfg.dim + model.cfg.vocab_size)
    return costs, first, last


def balance_stages(costs: Sequence[float], num_stages: int, first_extra: float = 0.0,
                   last_extra: float = 0.0) -> list[int]:
    """Blocks per stage (contiguous, >= 1 each) minimising the most expensive stage.

    Exact min-max linear partition by dynamic programming (O(stages x blocks^2), blocks are few);
    among equal optima the earliest split wins, so the result is deterministic."""
    n = len(costs)
    if num_stages < 1 or n < num_stages:
        _bad("stages_per_rank", f"{num_stages} stages need at least one block each, the model has {n} blocks")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))

    def stage_cost(k: int, i: int, j: int) -> float:  # stage k holds blocks i..j-1
        extra = (first_extra if k == 0 else 0.0) + (last_extra if k == num_stages - 1 else 0.0)
        return prefix[j] - prefix[i] + extra

    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, n - (num_stages - k) + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf:
                    continue
                value = max(best[k - 1][i], stage_cost(k - 1, i, j))
                if value < best[k][j] - 1e-9 * max(1.0, abs(value)):
                    best[k][j], cut[k][j] = value, i
    counts, j = [], n
    for k in range(num_stages, 0, -1):
        i = cut[k][j]
        counts.append(j - i)
        j = i
    return counts[::-1]


def balance_v_ranks(costs: Sequence[float], ranks: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[int]:
    """Blocks per stage for a V placement (rank r holds stages r and 2P-1-r): the most expensive
    RANK as cheap as possible, then, among those cuts, the most expensive stage. Both of a rank's
    stages run on one device and rank 0 also holds the embedding and the head, so balancing the
    stages one by one (``balance_stages``) leaves rank 0 the slowest.

    Exact, pairing stages from the outside in: pair r takes the next free blocks on the left
    (stage r) and on the right (stage 2P-1-r), the state (i, j) is the middle range still free, the
    innermost pair splits what is left. Two dynamic programmes over the O(P n^2) states, each
    step a vectorised minimum over the next state (i', j'): the smallest max rank cost R*, then
    the smallest max stage cost with every rank within R*."""
    import numpy as np

    n = len(costs)
    if ranks < 1 or n < 2 * ranks:
        _bad("stages_per_rank", f"{2 * ranks} stages need at least one block each, the model has {n} blocks")
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=np.float64))])
    span = prefix[None, :] - prefix[:, None]  # span[i, j] = cost of blocks [i, j)
    inf = np.inf

    def extras(r):
        return (first_extra, last_extra) if r == 0 else (0.0, 0.0)

    def innermost(cap):
        """(max rank cost, max stage cost, split) of the innermost pair on [i, j), ranks <= cap."""
        e_left, e_right = extras(ranks - 1)
        rank_cost = np.full((n + 1, n + 1), inf)
        stage_cost = np.full((n + 1, n + 1), inf)
        split = np.zeros((n + 1, n + 1), dtype=np.int64)
        for i in range(n - 1):
            for j in range(i + 2, n + 1):
                m = np.arange(i + 1, j)
                worst = np.maximum(span[i, m] + e_left, span[m, j] + e_right)
                k = int(np.argmin(worst))
                rank_cost[i, j] = span[i, j] + e_left + e_right
                if rank_cost[i, j] <= cap:
                    stage_cost[i, j], split[i, j] = worst[k], m[k]
        return rank_cost, stage_cost, split

    def outer(r, inner_value, cap, objective):
        """One pair further out: the best value of pairs r.. per state, and the (i', j') chosen."""
        need = 2 * (ranks - 1 - r)  # blocks the inner pairs need
        e_left, e_right = extras(r)
        table = np.full((n + 1, n + 1), inf)
        pick = np.zeros((n + 1, n + 1, 2), dtype=np.int64)
        for i in range(n + 1):
            for j in range(i + need + 2, n + 1):
                ip, jp = np.arange(i + 1, j)[:, None], np.arange(i + 1, j)[None, :]
                left, right = span[i, ip] + e_left, span[jp, j] + e_right
                pair_rank = left + right
                own = pair_rank if objective == "rank" else np.maximum(left, right)
                value = np.maximum(own, inner_value[ip, jp])
                value = np.where((jp - ip >= need) & (pair_rank <= cap), value, inf)
                k = int(np.argmin(value))
                table[i, j] = value.flat[k]
                pick[i, j] = (i + 1 + k // value.shape[1], i + 1 + k % value.shape[1])
        return table, pick

    # 1. the smallest max rank cost
    value = innermost(inf)[0]
    for r in range(ranks - 2, -1, -1):
        value = outer(r, value, inf, "rank")[0]
    cap = float(value[0, n]) * (1 + 1e-12)
    # 2. the smallest max stage cost with every rank within it
    _, value, split = innermost(cap)
    picks = {}
    for r in range(ranks - 2, -1, -1):
        value, picks[r] = outer(r, value, cap, "stage")
    left, right, i, j = [], [], 0, n
    for r in range(ranks - 1):
        ip, jp = (int(v) for v in picks[r][i, j])
        left.append(ip - i)
        right.append(j - jp)
        i, j = ip, jp
    m = int(split[i, j])
    left.append(m - i)
    right.append(j - m)
    return left + right[::-1]


def stage_block_ranges(counts: Sequence[int]) -> list[range]:
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


def plan_stage_blocks(model: MHCTransformer, num_stages: int, stage_blocks: Sequence[int] | None = None,
                      seq_len: int | None = None, balance: str = "stage") -> list[int]:
    """Blocks per stage: the explicit list when given (checked), else balanced by cost per stage
    (``balance="stage"``) or, for a V placement, per rank (``"rank"``, ``balance_v_ranks``)."""
    if stage_blocks is not None:
        return check_stage_blocks(stage_blocks, num_stages, len(model.blocks))
    costs, first, last = model_costs(model, seq_len)
    if balance == "rank":
        return balance_v_ranks(costs, num_stages // 2, first, last)
    return balance_stages(costs, num_stages, first, last)


# ------------------------------------------------------------------------ stage module


class _StandardLayoutGrad(torch.autograd.Function):
    """Identity on a stage's input streams whose backward hands their gradient on in the standard
    layout: the runtime sends it to the previous stage, p2p sends need contiguous tensors, and
    the torch path's mHC read returns it stored stream-major."""

    @staticmethod
    def forward(ctx, streams):
        return streams.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _InjectAuxLoss(torch.autograd.Function):
    """Identity on the stage output whose backward also sends gradient 1 into the stage's
    balance loss (scaled with the micro-batch like the cross-entropy), so the loss term lives
    and dies inside its stage. The output aliases the input without being a view (the pipeline
    runtime detaches stage outputs in place, which views do not allow)."""

    @staticmethod
    def forward(ctx, output, aux):
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return output.detach()

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_output.device)


class PipelineStageModule(nn.Module):
    """One pipeline stage of an ``MHCTransformer``: a contiguous slice of its blocks.

    Holds the model's own modules (no copies), under the model's names: ``embed`` (first stage),
    ``blocks.<global index>`` (a ModuleDict keyed by the global block index), ``contract``,
    ``norm`` and ``head`` (last stage). Its state_dict keys are therefore a subset of the full
    model's and a checkpoint of all stages is a checkpoint of the model.

    forward: first stage tokens [b, S] -> streams [b, S, n, C]; middle streams -> streams;
    last -> logits [b, S, V]. Outputs are never views.
    """

    # The model's own code, so the stage cannot drift from the single-process path.
    rope = MHCTransformer.rope
    embed_streams = MHCTransformer.embed_streams
    head_logits = MHCTransformer.head_logits
    recompute_block_size = MHCTransformer.recompute_block_size
    recompute_plan = MHCTransformer.recompute_plan

    def __init__(self, model: MHCTransformer, stage_index: int, num_stages: int, block_indices: Sequence[int],
                 post_res_stream: bool = False) -> None:
        super().__init__()
        block_indices = list(block_indices)
        if not block_indices or block_indices != list(range(block_indices[0], block_indices[-1] + 1)):
            raise ValueError(f"stage {stage_index}: blocks must be a non-empty contiguous range, got {block_indices}")
        self.cfg = model.cfg
        self.rcfg = model.rcfg
        self.n_streams = model.n_streams
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.is_first = stage_index == 0
        self.is_last = stage_index == num_stages - 1
        self.block_indices = block_indices
        if self.is_first:
            self.embed = model.embed
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in block_indices})
        if self.is_last:
            self.contract = model.contract
            self.norm = model.norm
            self.head = model.head
        # Recompute blocks restart at this stage's first sublayer (paper 4.3.3: recompute
        # decoupled from pipeline communication; the stage input is the first block's x_l0).
        self.recompute_boundaries: tuple[int, ...] = (2 * block_indices[0],)
        self.post_res_stream = post_res_stream
        self.aux_loss_values: list[torch.Tensor] = []  # detached balance loss per micro-batch

    def _regions(self, x: torch.Tensor):
        regions = self.recompute_plan()
        # Not with recomputation: its cache would cross streams unsynchronised (docs/pipeline.md).
        if self.post_res_stream and x.is_cuda and self.recompute_block_size() is None:
            regions = post_res_regions(regions, x.device)
        return regions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            if x.dim() != 2:
                raise ValueError(f"stage {self.stage_index}: expected tokens [b, S], got {tuple(x.shape)}")
            streams = self.embed_streams(x)
        else:
            if x.dim() != 4 or x.shape[-2] != self.n_streams or x.shape[-1] != self.cfg.dim:
                raise ValueError(f"stage {self.stage_index}: expected streams [b, S, {self.n_streams}, "
                                 f"{self.cfg.dim}], got {tuple(x.shape)}")
            streams = _StandardLayoutGrad.apply(x) if x.requires_grad else x
        rope = self.rope(x.shape[1], x.device)
        regions = self._regions(x)
        for block in self.blocks.values():
            streams = block(streams, rope, regions)
        out = self.head_logits(streams) if self.is_last else streams
        aux = self._take_balance_loss()
        if aux is not None:
            out = _InjectAuxLoss.apply(out, aux)
        if out._is_view() or not out.is_contiguous():
            # The runtime detaches outputs in place and sends them, and p2p sends need the
            # standard layout (the torch path's mHC streams are stored stream-major).
            out = out.clone(memory_format=torch.contiguous_format)
        return out

    def _take_balance_loss(self) -> torch.Tensor | None:
        """The sequence-wise balance loss of this stage's MoE layers for this micro-batch."""
        losses = []
        for block in self.blocks.values():
            if block.is_moe and block.ffn.aux_loss is not None:
                losses.append(block.ffn.aux_loss)
                block.ffn.aux_loss = None  # do not keep the graph alive past the forward
        if not losses or not torch.is_grad_enabled():
            return None
        total = torch.stack(losses).sum()
        self.aux_loss_values.append(total.detach())
        return total


# ---------------------------------------------------------------------------- building


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of one micro-batch, as ``MHCTransformer.forward`` computes it
    (mean over its tokens; the schedule then averages the micro-batches: scale_grads=True)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


@dataclass
class Pipeline:
    """What ``build_pipeline`` returns: the schedule and this rank's stages."""

    schedule: object  # a torch.distributed.pipelining schedule
    modules: list[PipelineStageModule]  # this rank's stage modules, in stage order
    stages: list[PipelineStage]
    schedule_name: str
    stage_blocks: list[int]  # blocks per stage, all stages
    stage_ranks: dict[int, int]  # stage -> pipeline rank
    rank: int
    world_size: int
    n_microbatches: int
    group: dist.ProcessGroup | None = None
    overlap_handler: object | None = None
    eval_schedule: object | None = None  # forward only (validation); None: schedule.eval
    balance_loss: bool = False  # seq_aux_loss_coef > 0: the balance loss is injected inside the stages
    last_ce_loss: torch.Tensor | None = None
    last_aux_loss: torch.Tensor | None = None

    @property
    def holds_first(self) -> bool:
        return any(m.is_first for m in self.modules)

    @property
    def holds_last(self) -> bool:
        return any(m.is_last for m in self.modules)

    def parameters(self):
        seen = set()
        for m in self.modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def named_parameters(self):
        """(full-model name, parameter) of this rank's stages."""
        for m in self.modules:
            yield from m.named_parameters()

    def step(self, tokens: torch.Tensor | None = None, targets: torch.Tensor | None = None,
             broadcast_loss: bool = False) -> torch.Tensor | None:
        """One forward+backward of the whole batch (gradients accumulate into .grad).

        Pass the batch on every rank (each uses what its stages need: tokens on the rank of the
        first stage, targets on the rank of the last). Returns the loss the gradients belong to,
        as ``MHCTransformer.forward``'s ``loss`` on the whole batch: the mean over micro-batches of
        the cross-entropy, plus the sequence-wise balance loss when ``seq_aux_loss_coef > 0``
        (summed over all stages: one all-reduce). It is returned on the last stage's rank, or on
        every rank with ``broadcast_loss``; else None. ``last_ce_loss`` / ``last_aux_loss`` keep
        the parts."""
        for m in self.modules:
            m.aux_loss_values.clear()
        if self.holds_first and tokens is None:
            raise ValueError("this rank holds the first stage: pass tokens")
        if self.holds_last and targets is None:
            raise ValueError("this rank holds the last stage: pass targets")
        args = (tokens,) if self.holds_first else ()
        target = targets if self.holds_last else None
        losses: list[torch.Tensor] | None = [] if self.holds_last else None
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        device = self.stages[0].device
        ce = torch.stack([l.detach().float() for l in losses]).mean().to(device) if losses else None
        if broadcast_loss:
            value = ce if ce is not None else torch.zeros((), device=device)
            owner = self.stage_ranks[len(self.stage_blocks) - 1]
            src = dist.get_global_rank(self.group, owner) if self.group is not None else owner
            dist.broadcast(value, src=src, group=self.group)
            ce = value
        aux = None
        if self.balance_loss:
            aux = torch.zeros((), device=device)
            for m in self.modules:  # each stage: its layers' loss, mean over micro-batches
                if m.aux_loss_values:
                    aux = aux + torch.stack(m.aux_loss_values).float().mean().to(device)
            dist.all_reduce(aux, group=self.group)
        self.last_ce_loss, self.last_aux_loss = ce, aux
        if ce is None:
            return None
        return ce if aux is None else ce + aux


    @torch.no_grad()
    def evaluate(self, tokens: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Forward only (validation): the mean cross-entropy of the batch over the micro-batches,
        returned on every rank. Pass the batch on every rank, as for ``step``."""
        holds_last = self.holds_last
        losses: list[torch.Tensor] = []
        schedule = self.eval_schedule or self.schedule
        schedule.eval(*((tokens,) if self.holds_first else ()), target=targets if holds_last else None,
                      losses=losses if holds_last else None)
        device = self.stages[0].device
        value = torch.stack([l.float() for l in losses]).mean().to(device) if holds_last else torch.zeros((), device=device)
        owner = self.stage_ranks[len(self.stage_blocks) - 1]
        dist.broadcast(value, src=dist.get_global_rank(self.group, owner) if self.group is not None else owner,
                       group=self.group)
        return value


def forward_only_schedule(stages: list[PipelineStage], stage_ranks: dict[int, int], n_microbatches: int,
                          loss_fn: Callable) -> object:
    """A forward-only schedule over multi-stage ranks: torch's V schedules cannot run ``eval``
    (their weight-gradient actions stay in the plan), so validation gets its own plan on the same
    runtime: each rank runs F for every micro-batch through its stages in stage order; the
    runtime inserts the sends and receives."""
    from torch.distributed.pipelining.schedules import FORWARD, _Action, _add_send_recv, _PipelineScheduleRuntime

    schedule = _PipelineScheduleRuntime(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=True)
    actions = {rank: [_Action(s, FORWARD, mb) for mb in range(n_microbatches)
                      for s in sorted(st for st, r in stage_ranks.items() if r == rank)]
               for rank in sorted(set(stage_ranks.values()))}
    # Lowered directly: the runtime's own loader insists on a backward for every micro-batch.
    # The constructor gave the (shared) stages the looped stage -> rank mapping: put the real one back.
    schedule.stage_index_to_group_rank = dict(stage_ranks)
    for stage in stages:
        stage.stage_index_to_group_rank = dict(stage_ranks)
    schedule.pipeline_order_with_comms = _add_send_recv(actions, stage_to_rank=lambda s: stage_ranks[s],
                                                        num_stages=len(stage_ranks))
    return schedule


def build_pipeline(
    model: MHCTransformer,
    schedule_name: str,
    n_microbatches: int,
    rank: int,
    world_size: int,
    *,
    microbatch_size: int,
    seq_len: int,
    stages_per_rank: int | None = None,
    stage_blocks: Sequence[int] | None = None,
    balance: str = "stage",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
    activation_dtype: torch.dtype | None = None,
    logits_dtype: torch.dtype | None = None,
    overlap: bool = True,
    overlap_concurrency: str = "auto",
    post_res_stream: bool = False,
) -> Pipeline:
    """Cut ``model`` into stages, keep this rank's, and build the named schedule.

    ``rank``/``world_size`` are the pipeline rank and size (of ``group``, default the world).
    ``microbatch_size`` x ``seq_len`` is one micro-batch: the stages are given static shapes, so
    no metadata-inference forward runs (it would push garbage through the routers and count it
    into their load statistics). ``activation_dtype`` is the dtype of the streams at the stage
    boundaries, ``logits_dtype`` that of the last stage's logits (default: the model's parameter
    dtype for both; under bf16 autocast the streams stay fp32 - embedding and residual sums are
    not autocast - while the head's logits are bf16). ``overlap`` registers the DualPipe-style F&B handler
    (dualpipev only; see ``mhc_train.parallel.overlap``).
    """
    schedule, spr = validate_pipeline(schedule_name, world_size, len(model.blocks), n_microbatches,
                                      stages_per_rank, stage_blocks, microbatch_size * n_microbatches)
    if not 0 <= rank < world_size:
        _bad("rank", f"rank {rank} outside the {world_size} pipeline ranks")
    num_stages = world_size * spr
    if balance not in ("stage", "rank"):
        _bad("balance", f"must be stage or rank, got {balance!r}")
    if balance == "rank" and schedule not in V_SCHEDULES:
        _bad("balance", f"rank balancing is for the V schedules ({', '.join(V_SCHEDULES)}), not {schedule}")
    counts = plan_stage_blocks(model, num_stages, stage_blocks, seq_len, balance)
    ranges = stage_block_ranges(counts)
    mapping = stage_to_rank(schedule, world_size, spr)
    mine = sorted(s for s, r in mapping.items() if r == rank)

    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = activation_dtype or param.dtype
    logits_dtype = logits_dtype or dtype
    mb, n, c = microbatch_size, model.n_streams, model.cfg.dim
    if post_res_stream and model.recompute_block_size() is not None and device.type == "cuda":
        warnings.warn("post_res_stream is off while residual recomputation is on: the recompute cache is not "
                      "stream-safe yet (docs/pipeline.md, 'Hooks'); the FFN post-res merge stays on the compute "
                      "stream", stacklevel=2)
        post_res_stream = False

    modules, stages = [], []
    for s in mine:
        module = PipelineStageModule(model, s, num_stages, ranges[s], post_res_stream=post_res_stream)
        streams_meta = torch.empty(mb, seq_len, n, c, dtype=dtype, device="meta", requires_grad=True)
        inputs = torch.empty(mb, seq_len, dtype=torch.long, device="meta") if s == 0 else streams_meta
        outputs = (torch.empty(mb, seq_len, model.cfg.vocab_size, dtype=logits_dtype, device="meta",
                               requires_grad=True)
                   if s == num_stages - 1 else streams_meta)
        stage = PipelineStage(module, s, num_stages, device, input_args=(inputs,), output_args=(outputs,),
                              group=group)
        modules.append(module)
        stages.append(stage)

    cls = SCHEDULE_CLASSES[schedule]
    if schedule in SINGLE_STAGE_SCHEDULES:
        sched = cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=True)
    else:
        sched = cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=True)

    handler = None
    if overlap and schedule == "dualpipev":
        handler = OverlapFBHandler(concurrency=overlap_concurrency)
        handler.install(sched)
    evaluator = forward_only_schedule(stages, mapping, n_microbatches, loss_fn) if len(stages) > 1 else None
    return Pipeline(sched, modules, stages, schedule, counts, mapping, rank, world_size, n_microbatches, group,
                    handler, evaluator, balance_loss=model.cfg.seq_aux_loss_coef > 0)


def build_pipeline_from_config(model: MHCTransformer, cfg: PipelineConfig, rank: int, world_size: int, *,
                               batch_size: int, seq_len: int, **kwargs) -> Pipeline:
    if batch_size % cfg.microbatches:
        _bad("microbatches", f"the batch of {batch_size} sequences must split evenly into {cfg.microbatches} "
             "micro-batches")
    return build_pipeline(model, cfg.schedule, cfg.microbatches, rank, world_size,
                          microbatch_size=batch_size // cfg.microbatches, seq_len=seq_len,
                          stages_per_rank=cfg.stages_per_rank, stage_blocks=cfg.stage_blocks, balance=cfg.balance,
                          overlap=cfg.overlap,
                          overlap_concurrency=cfg.overlap_concurrency, post_res_stream=cfg.post_res_stream, **kwargs)


__all__ = [
    "Pipeline",
    "PipelineConfig",
    "PipelineConfigError",
    "PipelineStageModule",
    "SCHEDULES",
    "balance_stages",
    "balance_v_ranks",
    "block_cost",
    "build_pipeline",
    "build_pipeline_from_config",
    "lm_loss",
    "local_stages",
    "model_costs",
    "plan_stage_blocks",
    "stage_to_rank",
    "validate_pipeline",
]
