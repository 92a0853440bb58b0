"""How one optimizer step runs under each parallel layout (``parallel.mode``).

The trainer owns the loop, the metrics, the skip logic and the checkpoints; a layout owns what
differs between engines. All three share one shape of step:

    layout.prepare()                       wrap each block (activation checkpointing, compile:
                                           mhc_train/train/block_wrappers.py), materialise this rank's
                                           weights (the model is built on the meta device) and wrap it /
                                           cut it into pipeline stages
    optimizer over layout.optimized_module, layout.attach(optimizer)   (DeepSpeed: the engine)
    per step:
      forward_backward(batches, autocast)          -> (loss, ce, aux) of this step, equal on all ranks
      reduce_router_loads(routers)                 -> the loads every rank's bias update sees
      update(grad_clip, allowed)                   -> (grad norm before clipping, applied?)
      zero_grad()
    eval_loss(inputs, targets, autocast[, segment_ids])  -> mean CE of one validation batch (every rank)
    reduce_sum(t)                                  validation totals over data-parallel ranks
    residual_gains(batch, sequences)               per-layer H_res and Amax gains (every rank)
    state_dicts() / load_state_dicts(...)          FQN-keyed model + optimizer state for DCP

Layouts:

- ``DataParallelLayout`` (single | ddp): the model's own autograd, or DDP.
- ``DeepSpeedLayout`` (deepspeed): a ZeRO-1/2 engine around our AdamW; clipping follows
  ``train.grad_clip`` (DeepSpeed's 1.0 default never applies); the engine skips a step whose
  gradients are not finite (also in bf16: ``check_grad_overflow``), we read whether it did.
- ``MeshLayout`` (mesh, and its presets fsdp | pipeline; ``mhc_train.train.mesh_layout``):
  pipeline x data x expert parallelism on one DeviceMesh: ``torch.distributed.pipelining``
  stages over ``pp``, FSDP2 / HSDP over the data ranks, routed experts over ``ep``.

Every layout writes checkpoints in one format (``get_state_dict`` with flattened optimizer
state: one key per parameter), so a run saved under one resumes under any other.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from mhc_train.autocast_state import autocast_context
from mhc_train.model import MHCTransformer
from mhc_train.parallel.data_parallel import full_value, wrap_deepspeed, wrap_model
from mhc_train.train.block_wrappers import wrap_blocks
from mhc_train.train.checkpoint import ModelState


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Layout:
    """The data-parallel layouts' common parts; subclasses override what differs."""

    mode = "single"

    def __init__(self, model: MHCTransformer, device: torch.device, cfg, bf16: bool):
        self.model = model
        self.device = device
        self.cfg = cfg  # the RunConfig
        self.bf16 = bf16
        self.rank = dist.get_rank() if _distributed() else 0
        self.world_size = dist.get_world_size() if _distributed() else 1
        self.optimizer: torch.optim.Optimizer | None = None

    # data parallelism: the loader's shard and the global batch
    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def dp_world_size(self) -> int:
        return self.world_size

    @property
    def optimized_module(self) -> nn.Module:
        """The module whose parameters this rank's optimizer updates."""
        return self.model

    def prepare(self) -> None:
        wrap_blocks(self.model, self.cfg)  # activation checkpointing, compile: still on the meta device
        self._materialize(self.model)

    def _materialize(self, module: nn.Module) -> None:
        """Allocate ``module``'s weights (meta until now) and initialise them: on the CPU, then moved,
        so the values are the same whatever the device (``MHCTransformer.init_weights``)."""
        module.to_empty(device="cpu")
        self.model.init_weights(seed=self.cfg.train.seed, only=module)
        module.to(self.device)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over the data-parallel ranks (losses: each rank saw its own part of the batch)."""
        if self.dp_world_size > 1:
            dist.all_reduce(values)
            values = values / self.dp_world_size
        return values

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.dp_world_size > 1:
            dist.all_reduce(values)
        return values

    def reduce_router_loads(self, routers) -> list[torch.Tensor]:
        """Every MoE layer's expert loads over all ranks (for the imbalance metric); the routers
        this rank holds are left with them for the bias update."""
        if self.dp_world_size > 1:  # every rank's bias update must see the global loads
            for r in routers:
                dist.all_reduce(r.expert_load)
        return [r.expert_load for r in routers]

    def residual_gains(self, batch, sequences: int):
        """The gain report on the first ``sequences`` of a validation batch (every rank runs it:
        FSDP's forward is collective)."""
        return self.model.residual_gains(batch[0][:sequences])

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dicts(self) -> tuple[dict, dict]:
        return ModelState(self.optimized_module, self.optimizer).state_dicts()

    def load_state_dicts(self, model_sd: dict, optim_sd: dict) -> None:
        ModelState(self.optimized_module, self.optimizer).load_state_dicts(model_sd, optim_sd)

    def _step_unless_skipped(self, norm: float, allowed: bool) -> tuple[float, bool]:
        """The optimizer steps unless the update is vetoed or the grad norm is not finite."""
        if allowed and math.isfinite(norm):
            self.optimizer.step()
            return norm, True
        return norm, False

    def _clip(self, params: list[torch.Tensor], grad_clip: float | None) -> float:
        if grad_clip:
            return full_value(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        return full_value(torch.nn.utils.get_total_norm([p.grad for p in params]))


class DataParallelLayout(Layout):
    """One process or DDP (``mhc_train.parallel.data_parallel.wrap_model``)."""

    def __init__(self, model, device, cfg, bf16):
        super().__init__(model, device, cfg, bf16)
        self.mode = cfg.parallel.mode

    def prepare(self) -> None:
        p, kwargs = self.cfg.parallel, {}
        super().prepare()
        if p.mode == "ddp":
            kwargs["find_unused_parameters"] = p.find_unused_parameters
        self.wrapped = wrap_model(self.model, p.mode, self.device, **kwargs)

    def forward_backward(self, batches, autocast: Callable):
        forward = self.wrapped.forward_module

        def sync(i: int, last: bool):  # DDP: all-reduce once per step, in the last micro-batch's backward
            return forward.no_sync() if self.wrapped.mode == "ddp" and not last else contextlib.nullcontext()

        return self.reduce_mean(model_steps(forward, batches, autocast, sync, self.device))

    def update(self, grad_clip: float | None, allowed: bool) -> tuple[float, bool]:
        params = [p for p in self.model.parameters() if p.grad is not None]
        return self._step_unless_skipped(self._clip(params, grad_clip), allowed)

    @torch.no_grad()
    def eval_loss(self, inputs, targets, autocast, segment_ids=None) -> torch.Tensor:
        with autocast():
            return self.wrapped.forward_module(inputs, targets, segment_ids=segment_ids).ce_loss.float()


def model_steps(forward: nn.Module, batches, autocast: Callable, sync: Callable,
                device: torch.device) -> torch.Tensor:
    """Forward and backward of each micro-batch through ``forward`` (the model or its DDP / FSDP
    wrapper); ``sync(i, last)`` is entered around micro-batch i and controls the gradient
    reduction. A batch is (inputs, targets) or, with data.document_mask, (inputs, targets,
    segment_ids). Returns this rank's (loss, ce, aux), averaged over the micro-batches.

    One autocast region spans the step: autocast keeps the low-precision copy of each weight it
    casts until its outermost region ends, so every micro-batch (and every recomputation in
    backward) reuses the copies made by the first forward instead of casting every weight again
    per micro-batch. The backward passes run inside the region with autocast off (they always ran
    outside autocast), which keeps those copies without changing any backward op."""
    accum = len(batches)
    sums = torch.zeros(3, device=device)  # loss, ce, aux
    with autocast():
        owner = threading.get_ident()
        for i, (inputs, targets, *segment_ids) in enumerate(batches):
            with sync(i, i == accum - 1):
                out = forward(inputs, targets, *segment_ids)
                with autocast_context([]):
                    loss = out.loss
                    hold_weight_casts_in_backward(loss, owner)
                    (loss / accum).backward()
                    sums += _parts(loss, out)
    return sums / accum


class _Held(threading.local):
    held = False


_held = _Held()


def hold_weight_casts() -> None:
    """Stop this thread from clearing autocast's weight-cast cache, for the rest of its life.

    The cache is one for all threads, and a thread clears it whenever it leaves its own outermost
    autocast region. Threads other than the one holding a step's region enter and leave regions of
    their own in the middle of the step: autograd's CUDA device threads (the connections' fp32
    backward maths, every recomputation) and DualPipeV's forward worker. Counting one region as
    open in such a thread, for good, keeps the copies until the step's own region ends, which
    still clears the cache before the optimizer changes the weights. Never call it in the thread
    that holds the step's region (its region would then never end)."""
    if not _held.held:
        torch.autocast_increment_nesting()
        _held.held = True


def hold_weight_casts_in_backward(tensor: torch.Tensor, owner: int) -> None:
    """``hold_weight_casts`` in whichever thread starts the backward through ``tensor``, unless it
    is ``owner`` (the thread of the step's region; on CPU autograd runs there)."""
    if not tensor.requires_grad:
        return

    def hook(grad):
        if threading.get_ident() != owner:
            hold_weight_casts()

    tensor.register_hook(hook)


class DeepSpeedLayout(Layout):
    """DeepSpeed ZeRO stage 1 or 2 around the run's AdamW (no JIT-built DeepSpeed ops)."""

    mode = "deepspeed"

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        t = self.cfg.train
        self.optimizer = optimizer  # the torch AdamW: our LR schedule sets its param groups' lr
        self.wrapped = wrap_deepspeed(self.model, optimizer, self.device, micro_batch=t.batch_size,
                                      grad_accum=t.grad_accum, grad_clip=t.grad_clip,
                                      zero_stage=self.cfg.parallel.zero_stage, bf16=self.bf16,
                                      bf16_weights=self.cfg.parallel.deepspeed_weights == "bf16")
        self.engine = self.wrapped.engine

    def forward_backward(self, batches, autocast: Callable):
        sums = torch.zeros(3, device=self.device)
        for i, (inputs, targets, *segment_ids) in enumerate(batches):
            with autocast():
                out = self.engine(inputs, targets, *segment_ids)
            loss = out.loss
            self.engine.backward(loss)  # scaled by 1 / grad_accum inside
            if i < len(batches) - 1:
                self.engine.step()  # a micro-step: the engine counts them to find the boundary
            sums += _parts(loss, out)
        return self.reduce_mean(sums / len(batches))

    def update(self, grad_clip: float | None, allowed: bool) -> tuple[float, bool]:
        # The boundary step clips (train.grad_clip) and updates - unless the gradients are not
        # finite, which is how a non-finite loss shows up after backward: the engine then zeroes
        # them and skips. ``allowed`` cannot veto it otherwise; it never differs from that.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()  # None only with compute_grad_norm off (not set here)
        norm = float("nan") if norm is None else full_value(norm)
        return norm, bool(self.engine.was_step_applied())

    def zero_grad(self) -> None:
        pass  # the engine zeroes the gradients in its boundary step

    @torch.no_grad()
    def eval_loss(self, inputs, targets, autocast, segment_ids=None) -> torch.Tensor:
        with autocast():  # ZeRO 1/2 keep whole parameters in the module
            return self.model(inputs, targets, segment_ids=segment_ids).ce_loss.float()

    def state_dicts(self) -> tuple[dict, dict]:
        from mhc_train.parallel.deepspeed_state import deepspeed_state_dicts, flatten_optimizer_state

        model_sd, optim_sd = deepspeed_state_dicts(self.engine, self.model)
        # The groups' names, to nest a loaded flat state again (a load always builds this template first).
        self._groups = [g["params"] for g in optim_sd["param_groups"]]
        return model_sd, flatten_optimizer_state(optim_sd)

    def load_state_dicts(self, model_sd: dict, optim_sd: dict) -> None:
        from mhc_train.parallel.deepspeed_state import load_deepspeed_state_dicts, nest_optimizer_state

        load_deepspeed_state_dicts(self.engine, self.model, model_sd, nest_optimizer_state(optim_sd, self._groups))


def _parts(loss: torch.Tensor, out) -> torch.Tensor:
    aux = out.aux_loss.detach().float() if out.aux_loss is not None else torch.zeros((), device=loss.device)
    return torch.stack([loss.detach().float(), out.ce_loss.detach().float(), aux])


def make_layout(model: MHCTransformer, device: torch.device, cfg, bf16: bool) -> Layout:
    mode = cfg.parallel.mode
    if mode == "deepspeed":
        return DeepSpeedLayout(model, device, cfg, bf16)
    if mode in ("fsdp", "pipeline", "mesh"):
        from mhc_train.train.mesh_layout import MeshLayout

        return MeshLayout(model, device, cfg, bf16)
    return DataParallelLayout(model, device, cfg, bf16)
