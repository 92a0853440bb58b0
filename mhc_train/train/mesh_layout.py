"""``MeshLayout``: one optimizer step under pipeline x data x expert parallelism on one DeviceMesh.

``parallel=mesh`` reads the degrees from the config; the presets are special cases of it:
``fsdp`` (dp_shard = world, optionally with ep) and ``pipeline`` (pp = world). How a step runs:

    prepare()   build the mesh (mhc_train.parallel.mesh); pp > 1: cut this pipeline rank's stages
                (pipeline group = the pp dimension); wrap their blocks (activation checkpointing,
                compile: mhc_train/train/block_wrappers.py); ep > 1: shard the routed experts over ep
                (still on the meta device); then each stage (or the model) is materialised block
                by block and FSDP2-sharded over the data ranks, experts over theirs
    step        pp > 1: the schedule runs the micro-batches of this data rank's batch;
                pp = 1: grad_accum micro-batches, FSDP reduce-scatters after the last
                loss: mean over the data ranks; grad norm: one all-reduce over the world
                (``global_grad_norm``); router loads: summed over the data ranks of each
                pipeline position, so every copy of a router applies the one-process bias update
    checkpoints DCP with DTensors: any mesh saves global tensors, any other mesh loads them

Every data rank reads its own part of the batch (``dp_rank`` of ``dp_world_size``); the ranks
of one pipeline read the same part.
"""

from __future__ import annotations

import contextlib
import threading
import types
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from mhc_train.autocast_state import autocast_context, autocast_state
from mhc_train.parallel.data_parallel import shard_model
from mhc_train.parallel.grad_norm import clip_grads_, global_grad_norm
from mhc_train.parallel.mesh import build_mesh
from mhc_train.residual import activation_dtype, composite_gains
from mhc_train.train.block_wrappers import wrap_blocks
from mhc_train.train.config import mesh_degrees, reshard_after_forward
from mhc_train.train.layouts import Layout, hold_weight_casts, hold_weight_casts_in_backward, model_steps


class RankStages(nn.Module):
    """This rank's pipeline stages as one module under the full model's names (``embed``,
    ``blocks.<global index>``, ``contract``, ``norm``, ``head``): its optimizer and checkpoint
    keys are exactly the full model's, restricted to what this rank trains."""

    def __init__(self, stage_modules):
        super().__init__()
        self.blocks = nn.ModuleDict()
        for m in stage_modules:
            for name in ("embed", "contract", "norm", "head"):
                if hasattr(m, name) and isinstance(getattr(m, name), nn.Module):
                    setattr(self, name, getattr(m, name))
            self.blocks.update(m.blocks)


def _blocks(root: nn.Module) -> list[nn.Module]:
    blocks = root.blocks
    return list(blocks.values()) if isinstance(blocks, nn.ModuleDict) else list(blocks)


def _under_step_autocast(stage: nn.Module, layout: "MeshLayout") -> None:
    """Run ``stage``'s forward under the training step's autocast state (``forward_backward``),
    keeping autocast's weight casts for the whole step in other threads too (DualPipeV's forward
    worker; autograd's CUDA device threads, from the output's backward on: ``hold_weight_casts``);
    outside a step (evaluation) as called."""
    forward = type(stage).forward

    def run(self, *args, **kwargs):
        state, owner = layout._step_autocast, layout._step_thread
        if state is None:
            return forward(self, *args, **kwargs)
        if threading.get_ident() != owner:
            hold_weight_casts()
        with autocast_context(state):
            out = forward(self, *args, **kwargs)
        if isinstance(out, torch.Tensor):
            hold_weight_casts_in_backward(out, owner)
        return out

    stage.forward = types.MethodType(run, stage)


class MeshLayout(Layout):
    def __init__(self, model, device, cfg, bf16):
        super().__init__(model, device, cfg, bf16)
        self._step_autocast: list | None = None  # during a pipeline step (_under_step_autocast)
        self._step_thread: int | None = None
        self.mode = cfg.parallel.mode
        self.degrees = mesh_degrees(cfg.parallel, self.world_size, cfg.model)
        self.pipe = None
        self.local: nn.Module = model
        self.sharded = False

    @property
    def dp_rank(self) -> int:
        return self.mesh.dp_rank

    @property
    def dp_world_size(self) -> int:
        return self.degrees.dp

    @property
    def optimized_module(self) -> nn.Module:
        return self.local

    def _dp_group(self):
        return self.mesh.group("dp") if self.degrees.dp > 1 else None

    def prepare(self) -> None:
        from mhc_train.parallel.expert_parallel import apply_expert_parallel

        d, p, t = self.degrees, self.cfg.parallel, self.cfg.train
        if d.ep > 1 and self.device.type == "cuda" and dist.get_backend() == "gloo":
            from mhc_train.train.errors import ConfigError

            raise ConfigError("parallel.backend: gloo has no all-to-all for CUDA tensors; expert parallelism on GPUs "
                              "needs nccl (parallel.backend=auto)")
        self.mesh = build_mesh(d, self.device.type)
        roots: list[nn.Module] = [self.model]
        if d.pp > 1:
            from mhc_train.parallel.pipeline import build_pipeline_from_config

            self.pipe = build_pipeline_from_config(
                self.model, p.pipeline, self.mesh.pp_rank, d.pp, batch_size=t.batch_size, seq_len=t.seq_len,
                group=self.mesh.group("pp"), device=self.device,
                activation_dtype=activation_dtype(self.cfg.residual.stream_dtype, self.bf16,
                                                  next(self.model.parameters()).dtype),
                logits_dtype=torch.bfloat16 if self.bf16 else None)
            roots = self.pipe.modules
            self.local = RankStages(roots)
            for root in roots:
                _under_step_autocast(root, self)
        data_mesh = self.mesh.data_mesh()
        for root in roots:  # per block, before expert parallelism and FSDP wrap or allocate anything
            wrap_blocks(root, self.cfg, fsdp_mixed_precision=data_mesh is not None and self.bf16)
        if d.ep > 1:  # on the meta device: each rank materialises only its experts
            apply_expert_parallel([b.ffn for r in roots for b in _blocks(r) if b.is_moe], self.mesh.ep_mesh())
        for root in roots:
            if data_mesh is None:
                self._materialize(root)
            else:  # block by block: materialise, then shard, so no rank holds a whole stage at once
                shard_model(root, _blocks(root), data_mesh, expert_mesh=self.mesh.expert_data_mesh(),
                            reshard_after_forward=reshard_after_forward(p, d.pp), mixed_precision=self.bf16,
                            materialize=self._materialize)
        self.sharded = data_mesh is not None

    # ------------------------------------------------------------------------------ step

    def forward_backward(self, batches, autocast: Callable):
        if self.pipe is None:
            def sync(i: int, last: bool):
                if self.sharded:  # reduce-scatter once, after the last micro-batch
                    self.model.set_requires_gradient_sync(last)
                return contextlib.nullcontext()

            return self.reduce_mean(model_steps(self.model, batches, autocast, sync, self.device))
        (inputs, targets), = batches  # the pipeline's micro-batches accumulate (validated)
        # One autocast region for the step, as in model_steps: the weight casts of the first forward
        # are reused by every micro-batch's forward and recomputation instead of one copy per
        # micro-batch in flight. Autocast itself is off in the region and back on inside each stage
        # forward (_under_step_autocast), so the schedule's backward passes run without it, as in
        # one process (under autocast the backward of an fp32 op, the router's, ran in bf16).
        with autocast():
            self._step_autocast, self._step_thread = autocast_state(), threading.get_ident()
            try:
                with autocast_context([]):
                    loss = self.pipe.step(inputs, targets, broadcast_loss=True)
            finally:
                self._step_autocast = None
        ce = self.pipe.last_ce_loss
        aux = self.pipe.last_aux_loss if self.pipe.last_aux_loss is not None else torch.zeros((), device=self.device)
        parts = torch.stack([loss.detach().float(), ce.detach().float(), aux.detach().float()])
        return self.reduce_mean(parts)

    def reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.degrees.dp > 1:
            dist.all_reduce(values, group=self._dp_group())
            values = values / self.degrees.dp
        return values

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.degrees.dp > 1:
            dist.all_reduce(values, group=self._dp_group())
        return values

    def reduce_router_loads(self, routers) -> list[torch.Tensor]:
        """Each held router's loads summed over the data ranks (they route different tokens to
        the same experts: the bias update then equals one process's); the metric gets every
        layer by one more all-reduce over the pipeline (its stages hold disjoint layers)."""
        if not routers:
            return []
        held = [i for i, r in enumerate(routers) if not r.expert_load.is_meta]
        loads = torch.zeros(len(routers), routers[0].expert_load.shape[0], device=self.device)
        for i in held:
            loads[i] = routers[i].expert_load
        if self.degrees.dp > 1:
            dist.all_reduce(loads, group=self._dp_group())
            for i in held:
                routers[i].expert_load.copy_(loads[i])
        if self.degrees.pp > 1:
            dist.all_reduce(loads, group=self.mesh.group("pp"))
        return list(loads)

    def update(self, grad_clip: float | None, allowed: bool) -> tuple[float, bool]:
        params = [q for q in self.local.parameters() if q.grad is not None]
        total = global_grad_norm(params, data_ranks=self.degrees.dp, device=self.device)
        if grad_clip:
            clip_grads_(params, grad_clip, total)
        return self._step_unless_skipped(float(total), allowed)

    # ------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def eval_loss(self, inputs, targets, autocast, segment_ids=None) -> torch.Tensor:
        with autocast():
            if self.pipe is not None:
                if segment_ids is not None:
                    raise ValueError("data.document_mask: not supported with pipeline parallelism (pp > 1)")
                return self.pipe.evaluate(inputs, targets)
            return self.model(inputs, targets, segment_ids=segment_ids).ce_loss.float()

    @torch.no_grad()
    def residual_gains(self, batch, sequences: int):
        """pp = 1: the model's own report (every rank runs it: FSDP and EP forwards are
        collective). pp > 1: H_res of every connection from a forward-only pass; each rank records
        its stages' connections and one all-reduce over the pipeline assembles the layers. The
        stages have static shapes, so the batch keeps its size: the first ``sequences`` repeated to
        fill it (the same token average as over those sequences alone) when they divide it, else
        the whole batch."""
        if self.pipe is None:
            return self.model.residual_gains(batch[0][:sequences])
        inputs, targets = batch
        if sequences < inputs.shape[0] and inputs.shape[0] % sequences == 0:
            repeats = inputs.shape[0] // sequences
            batch = (inputs[:sequences].repeat(repeats, 1), targets[:sequences].repeat(repeats, 1))
        conns = {2 * int(index) + j: c for m in self.pipe.modules for index, block in m.blocks.items()
                 for j, c in enumerate((block.attn_conn, block.ffn_conn))}
        n = self.model.n_streams
        h = torch.zeros(2 * len(self.model.blocks), n, n, device=self.device)
        was_training = self.model.training
        self.model.eval()
        for c in conns.values():
            c.start_recording()
        try:
            self.pipe.evaluate(*batch)
            for layer, c in conns.items():
                h[layer] = c.recorded_h_res
        finally:
            for c in conns.values():
                c.stop_recording()
            self.model.train(was_training)
        dist.all_reduce(h, group=self.mesh.group("pp"))
        return composite_gains(h.cpu())
