"""Activation checkpointing under the pipeline and FSDP, against no checkpointing, on CPU (gloo),
in one launch of 2 ranks:

    torchrun --standalone --nproc_per_node=2 tests/dist_scripts/activation_checkpoint_check.py

For every layout (pp=2 with 1F1B and with DualPipeV and its overlap handler, FSDP over 2 ranks
with ep=2, and FSDP and pp=2 in bf16 autocast, where the router's FSDP group is nested in the
block's) the trainer's ``MeshLayout`` is built from the same config with each
``train.activation_checkpoint`` option, with ``residual.recompute=auto`` (mHC; each option
alone is checked in one process), and runs two optimizer steps of the same batches. Required,
bitwise against ``none`` with recompute off (the checkpoint re-runs the same ops on the same
values): the losses, every gradient of the first step, the routers' loads, their biases after
each update and the parameters after the second step. The pp=2 bf16 cases also count the bf16
casts of each weight per step: one, with 1F1B (four micro-batches) and with DualPipeV (eight,
its forward chunks in worker threads), the routed experts' stacked weights included
(RoutedExperts casts them itself, cached by mhc_train.weight_casts). One line per case;
exit 1 on any failure.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import threading
import time
import types

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from mhc_train.weight_casts import step_region
from mhc_train.train.block_wrappers import blocks_of
from layout_builder import build_layout, local

PP2 = ["parallel=mesh", "parallel.pp=2", "train.batch_size=4"]
LAYOUTS = {
    "pp2_1f1b": (PP2 + ["parallel.pipeline.schedule=1f1b", "parallel.pipeline.microbatches=2",
                         "parallel.pipeline.stage_blocks=[2,2]"], False),
    "pp2_dualpipev": (PP2 + ["parallel.pipeline.schedule=dualpipev", "parallel.pipeline.microbatches=4",
                              "parallel.pipeline.stage_blocks=[1,1,1,1]"], False),
    "fsdp_ep2": (["parallel=fsdp", "parallel.ep=2", "train.batch_size=2"], False),
    "fsdp_bf16": (["parallel=fsdp", "train.batch_size=2"], True),
    "pp2_1f1b_bf16": (PP2 + ["parallel.pipeline.schedule=1f1b", "parallel.pipeline.microbatches=4",
                               "parallel.pipeline.stage_blocks=[2,2]"], True),
}
GRID = [("none", "off"), ("selective", "auto"), ("full", "auto")]  # off alone: tests/test_activation_checkpoint.py
GRIDS = {"pp2_1f1b_bf16": [("none", "off"), ("full", "auto")]}


class WeightCasts(TorchDispatchMode):
    """Counts ``_to_copy`` of the given parameters (autocast's casts, and explicit ones)."""

    def __init__(self, named_params) -> None:
        super().__init__()
        self.names = {p.data_ptr(): n for n, p in named_params}
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.names:
            self.counts[self.names[args[0].data_ptr()]] += 1
        return func(*args, **(kwargs or {}))


def build(overrides: list[str], mode: str, recompute: str, bf16: bool):
    return build_layout(["model=tiny", "model.n_layers=4", "model.seq_aux_loss_coef=0.01", "train.seq_len=16",
                         "residual=mhc", f"residual.recompute={recompute}", f"train.activation_checkpoint={mode}",
                         *overrides], bf16)


def train(overrides, mode, recompute, bf16, data):
    model, layout = build(overrides, mode, recompute, bf16)
    autocast = BF16 if bf16 else contextlib.nullcontext
    d, r = layout.dp_world_size, layout.dp_rank
    routers = [m.router for m in model.moe_layers()]
    out = {"losses": [], "loads": [], "biases": [], "casts": None}
    for step, tokens in enumerate(data):
        batch = [(tokens[r::d, :-1], tokens[r::d, 1:])]
        counter = WeightCasts(layout.optimized_module.named_parameters())
        with counter if step == 0 else contextlib.nullcontext():
            parts = layout.forward_backward(batch, autocast)
        if step == 0:
            out["casts"] = counter.counts
            out["grads"] = {n: local(p.grad).clone() for n, p in layout.optimized_module.named_parameters()
                            if p.grad is not None}
        out["losses"].append(parts.clone())
        out["loads"].append(torch.stack(layout.reduce_router_loads(routers)).clone())
        layout.update(1.0, allowed=True)
        model.update_router_biases()
        layout.zero_grad()
        out["biases"].append(torch.stack([r.expert_bias.clone() for r in routers if not r.expert_bias.is_meta]))
    out["params"] = {n: local(p).detach().clone() for n, p in layout.optimized_module.named_parameters()}
    out["wrapped"] = all(getattr(b.forward, "activation_checkpoint", False)
                         for b in blocks_of(layout.optimized_module)) if mode != "none" else None
    return out


def compare(got, ref) -> list[str]:
    problems = []
    for key in ("losses", "loads", "biases"):
        if not all(torch.equal(a, b) for a, b in zip(got[key], ref[key])):
            problems.append(key)
    if got["grads"].keys() != ref["grads"].keys() or not all(torch.equal(got["grads"][k], ref["grads"][k])
                                                             for k in ref["grads"]):
        problems.append("gradients")
    if not all(torch.equal(got["params"][k], ref["params"][k]) for k in ref["params"]):
        problems.append("parameters")
    if got["wrapped"] is False:
        problems.append("blocks not checkpointed")
    return problems


def dualpipev_casts() -> list[str]:
    """bf16 casts per weight in one DualPipeV step of 8 micro-batches, counted in every thread: the
    overlap handler runs each pair's forward chunk in a worker thread, whose autocast regions
    would clear the (process-wide) weight-cast cache at their end without ``hold_weight_casts``."""
    model, layout = build(PP2[:2] + ["train.batch_size=8", "parallel.pipeline.schedule=dualpipev",
                                     "parallel.pipeline.microbatches=8", "parallel.pipeline.stage_blocks=[1,1,1,1]"],
                          "none", "off", True)
    counter = WeightCasts(layout.optimized_module.named_parameters())
    for stage in layout.pipe.modules:  # the counting mode is per thread: enter it in the workers too
        def counted(self, *args, _forward=stage.forward, **kwargs):
            if threading.current_thread() is threading.main_thread():
                return _forward(*args, **kwargs)
            worker = WeightCasts(())
            worker.names, worker.counts = counter.names, counter.counts
            with worker:
                return _forward(*args, **kwargs)

        stage.forward = types.MethodType(counted, stage)
    tokens = torch.randint(0, 512, (8, 17), generator=torch.Generator().manual_seed(0))
    with counter:
        layout.forward_backward([(tokens[:, :-1], tokens[:, 1:])], BF16)
    many = {k: v for k, v in counter.counts.items() if v != 1}
    return [f"weight casts per step {many}"] if many or not counter.counts else []


def BF16():
    return step_region("cpu", torch.bfloat16)  # what the trainer's autocast() returns


def main() -> int:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 512, (4, 17), generator=gen) for _ in range(2)]
    ok = True
    for name, (overrides, bf16) in LAYOUTS.items():
        grid = GRIDS.get(name, GRID)
        ref = None
        for mode, recompute in grid:
            start = time.perf_counter()
            got = train(overrides, mode, recompute, bf16, data)
            problems = [] if ref is None else compare(got, ref)
            if ref is None:
                ref = got
            if name == "pp2_1f1b_bf16":  # bf16 copies once per step, not once per micro-batch (4 here),
                # the routed experts' stacked weights too (mhc_train.weight_casts)
                many = {k: v for k, v in got["casts"].items() if v != 1}
                if not got["casts"] or many:
                    problems.append(f"weight casts per step {dict(many) or 'none counted'}")
            flags = torch.tensor([float(bool(problems))])
            dist.all_reduce(flags)
            ok &= flags.item() == 0
            if rank == 0:
                casts = f" casts/step {sum(got['casts'].values())} of {len(got['casts'])} weights" if bf16 else ""
                print(f"{'ok  ' if flags.item() == 0 else 'FAIL'} {name:<15} {mode:<9} recompute={recompute:<4} "
                      f"losses {[f'{float(x[0]):.5f}' for x in got['losses']]}{casts} "
                      f"{time.perf_counter() - start:.1f}s {' '.join(problems)}",
                      flush=True)
    problems = dualpipev_casts()
    flags = torch.tensor([float(bool(problems))])
    dist.all_reduce(flags)
    ok &= flags.item() == 0
    if rank == 0:
        print(f"{'ok  ' if flags.item() == 0 else 'FAIL'} pp2_dualpipev_bf16 casts once per step (8 micro-batches, "
              f"worker threads counted) {' '.join(problems)}", flush=True)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
