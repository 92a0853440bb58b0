"""DualPipeV's overlapped pairs, phase-split (the chunks take turns at every expert all-to-all),
against the same schedule run in order, under pp=2 x ep=2 on CPU (gloo), in one launch.

    torchrun --standalone --nproc_per_node=4 tests/dist_scripts/overlap_check.py

For every case (mHC and baseline with residual.recompute off and auto; HC) two mesh layouts of the
trainer (``MeshLayout``: FSDP2 over the data ranks, experts over ep) are built from the same
config, one with ``parallel.pipeline.overlap_concurrency=phases``, one ``sequential``; each runs
two optimizer steps of the same batches. Required, bitwise: the losses, every gradient of the
first step, the routers' loads and their balancing biases after each update, and the parameters
after the second step. And on every rank the recorded order of one pair shows the interleaving:
between the forward chunk's dispatch issue and its wait, the backward chunk computed (it resumed
and issued a collective of its own). One line per case; exit 1 on any failure.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist
from layout_builder import build_layout, local

CASES = [("mhc", "off"), ("mhc", "auto"), ("baseline", "off"), ("baseline", "auto"), ("hc", "off")]


def build(variant: str, recompute: str, concurrency: str):
    model, layout = build_layout([
        "model=tiny", "model.n_layers=4", "model.n_dense_layers=0", "train.seq_len=16", "train.batch_size=4",
        f"residual={variant}", f"residual.recompute={recompute}", "parallel=mesh", "parallel.pp=2", "parallel.ep=2",
        "parallel.pipeline.schedule=dualpipev", "parallel.pipeline.microbatches=4",
        f"parallel.pipeline.overlap_concurrency={concurrency}"], bf16=False)
    layout.pipe.overlap_handler.record_phases = True
    return model, layout


def train(variant: str, recompute: str, concurrency: str, data):
    model, layout = build(variant, recompute, concurrency)
    d, r = layout.dp_world_size, layout.dp_rank  # each data rank reads rows r, r + D, ... (as the trainer)
    batches = [(b[r::d, :-1], b[r::d, 1:]) for b in data]
    routers = [m.router for m in model.moe_layers()]
    out = {"losses": [], "grads": None, "biases": []}
    for step, (inputs, targets) in enumerate(batches):
        parts = layout.forward_backward([(inputs, targets)], contextlib.nullcontext)
        out["losses"].append(parts.clone())
        if step == 0:
            out["grads"] = {n: local(p.grad).clone() for n, p in layout.optimized_module.named_parameters()
                            if p.grad is not None}
        out.setdefault("loads", []).append(torch.stack(layout.reduce_router_loads(routers)).clone())
        layout.update(1.0, allowed=True)
        model.update_router_biases()
        layout.zero_grad()
        out["biases"].append(torch.stack([r.expert_bias.clone() for r in routers if not r.expert_bias.is_meta]))
    out["params"] = {n: local(p).detach().clone() for n, p in layout.optimized_module.named_parameters()}
    out["pairs"] = layout.pipe.overlap_handler.pair_events
    return out


def interleaved(pair: dict) -> bool:
    """B computed between F's dispatch issue and F's wait for it."""
    events = pair["events"]
    for i, (chunk, what, label) in enumerate(events):
        if chunk == "F" and what == "issue" and label == "dispatch":
            end = next((j for j in range(i + 1, len(events)) if events[j][:3] == ("F", "waited", "dispatch")), None)
            between = events[i + 1:end]
            if end is not None and any(c == "B" and w == "resume" for c, w, _ in between) and \
                    any(c == "B" and w in ("issue", "end") for c, w, _ in between):
                return True
    return False


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 512, (8, 17), generator=gen) for _ in range(2)]
    ok = True
    for variant, recompute in CASES:
        phases = train(variant, recompute, "phases", data)
        plain = train(variant, recompute, "sequential", data)
        problems = []
        if not all(torch.equal(a, b) for a, b in zip(phases["losses"], plain["losses"])):
            problems.append("losses")
        if phases["grads"].keys() != plain["grads"].keys() or not all(
                torch.equal(phases["grads"][k], plain["grads"][k]) for k in plain["grads"]):
            problems.append("gradients")
        if not all(torch.equal(a, b) for a, b in zip(phases["loads"], plain["loads"])):
            problems.append("router loads")
        if not all(torch.equal(a, b) for a, b in zip(phases["biases"], plain["biases"])):
            problems.append("router biases")
        if not all(torch.equal(phases["params"][k], plain["params"][k]) for k in plain["params"]):
            problems.append("parameters")
        pairs = phases["pairs"]
        if not pairs or not any(interleaved(p) for p in pairs):
            problems.append(f"no interleaved pair among {len(pairs)}")
        flags = torch.tensor([float(bool(problems))])
        dist.all_reduce(flags)
        if rank == 0:
            status = "ok" if not flags.item() else f"FAIL ({', '.join(problems) or 'on another rank'})"
            moved = (phases["biases"][-1].abs().sum() > 0).item()
            print(f"{variant:<8} recompute={recompute:<4} {status}  pairs={len(pairs)} "
                  f"loss={phases['losses'][0][0].item():.6f} biases_moved={moved}", flush=True)
        ok = ok and not flags.item()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
