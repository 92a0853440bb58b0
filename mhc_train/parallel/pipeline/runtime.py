"""Building and running a pipeline: ``build_pipeline`` cuts the model into stages and builds the
named torch schedule; ``Pipeline`` steps it (loss, balance loss) and evaluates it forward only."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage

from mhc_train.model.transformer import MHCTransformer
from mhc_train.parallel.pipeline.balance import plan_stage_blocks, stage_block_ranges
from mhc_train.parallel.pipeline.config import (
    SCHEDULE_CLASSES,
    SINGLE_STAGE_SCHEDULES,
    V_SCHEDULES,
    PipelineConfig,
    _bad,
    stage_to_rank,
    validate_pipeline,
)
from mhc_train.parallel.pipeline.overlap import OverlapFBHandler
from mhc_train.parallel.pipeline.stages import PipelineStageModule

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
    dtype for both; the trainer passes ``residual.stream_dtype`` resolved, bf16 in a bf16 run, and
    bf16 logits). ``overlap`` registers the DualPipe-style F&B handler
    (dualpipev only; see ``mhc_train.parallel.pipeline.overlap``).
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
        module.boundary_dtype = dtype
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
