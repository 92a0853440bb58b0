"""Expert-parallel MoE layers against the same layer in one process, on CPU (gloo), in one launch.

    torchrun --standalone --nproc_per_node=2 tests/dist_scripts/expert_parallel_check.py

Every rank builds the same tiny MoE (same seed) and the same global batch of tokens; the
reference is the whole batch through the unsharded layer, computed on every rank. The EP layer
(experts sharded over all ranks as DTensors, tokens through all-to-all) runs each rank's share of
the batch; its output rows and every gradient (input, router, shared expert, each rank's expert
shard times ep to undo the 1/ep data-parallel scale) must equal the reference's within fp32
rounding. Cases: uneven routing, empty experts, every token to one rank's experts (the other
receives nothing), a rank without tokens, bf16 autocast (dispatch sent in bf16). Prints one line
per case and exits 1 on any mismatch.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from mhc_train.model import load_model_config
from mhc_train.model.moe import MoE
from mhc_train.parallel.expert_parallel import apply_expert_parallel


def build(cfg) -> MoE:
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return moe


def run_case(name: str, cfg, tokens: torch.Tensor, shares: list[slice], bias: torch.Tensor | None,
             bf16: bool, mesh) -> bool:
    rank, ep = dist.get_rank(), dist.get_world_size()
    ref, moe = build(cfg), build(cfg)
    for m in (ref, moe):
        if bias is not None:
            m.router.expert_bias.copy_(bias)
    apply_expert_parallel([moe], mesh)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    x_ref = tokens.clone().requires_grad_()
    with autocast:
        y_ref = ref(x_ref)
    grad_out = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1))
    (y_ref.float() * grad_out).sum().backward()

    share = shares[rank]
    x = tokens[share].clone().requires_grad_()
    with autocast:
        y = moe(x)
    (y.float() * grad_out[share]).sum().backward()

    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-5, atol=1e-6)
    checks = {"output": (y, y_ref[share]), "input grad": (x.grad, x_ref.grad[share])}
    n_local = cfg.n_routed_experts // ep
    rows = slice(rank * n_local, (rank + 1) * n_local)
    for w in ("w1", "w3", "w2"):
        local = getattr(moe.experts, w).grad.to_local()  # this rank's experts, scaled by 1 / ep
        checks[f"experts.{w}"] = (local * ep, getattr(ref.experts, w).grad[rows])
    # the data-parallel parameters: each rank holds the gradient of its own tokens; summed over the
    # ranks they are the reference's
    for pname, p in moe.named_parameters():
        if pname.startswith("experts."):
            continue
        total = p.grad.clone()
        dist.all_reduce(total)
        checks[pname] = (total, dict(ref.named_parameters())[pname].grad)
    bad = [k for k, (got, want) in checks.items() if not torch.allclose(got.float(), want.float(), **tol)]
    loads = moe.router.expert_load.clone()
    dist.all_reduce(loads)
    if not torch.equal(loads, ref.router.expert_load):
        bad.append("router loads")
    if rank == 0:
        worst = max((got.float() - want.float()).abs().max().item() for got, want in checks.values())
        print(f"{name:<28} {'ok' if not bad else 'MISMATCH ' + ', '.join(bad)}  max |diff| {worst:.2e}", flush=True)
    return not bad


def main() -> int:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    ep = dist.get_world_size()
    mesh = init_device_mesh("cpu", (ep,), mesh_dim_names=("ep",))
    cfg = load_model_config("tiny")
    tokens = torch.randn(24, cfg.dim, generator=torch.Generator().manual_seed(2))
    even = [slice(r * 24 // ep, (r + 1) * 24 // ep) for r in range(ep)]
    e = cfg.n_routed_experts
    one_rank = torch.full((e,), -10.0)
    one_rank[: e // ep] = 10.0  # every token to rank 0's experts
    empty = torch.zeros(e)
    empty[1] = empty[e - 2] = -10.0  # two experts never chosen
    uneven = [slice(0, 20)] + [slice(20 + (r - 1) * 4 // max(ep - 1, 1), 20 + r * 4 // max(ep - 1, 1))
                               for r in range(1, ep)]
    no_tokens = [slice(0, 24)] + [slice(24, 24)] * (ep - 1)
    ok = all([
        run_case("uneven routing", cfg, tokens, even, None, False, mesh),
        run_case("empty experts", cfg, tokens, even, empty, False, mesh),
        run_case("all to one rank's experts", cfg, tokens, even, one_rank, False, mesh),
        run_case("uneven token shares", cfg, tokens, uneven, None, False, mesh),
        run_case("a rank without tokens", cfg, tokens, no_tokens, None, False, mesh),
        run_case("bf16 autocast", cfg, tokens, even, None, True, mesh),
    ])
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's teardown, as the trainer's workers do (app.py): a rank once
    # aborted there ("terminate called without an active exception", SIGABRT) after every case
    # had passed and the group was destroyed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
