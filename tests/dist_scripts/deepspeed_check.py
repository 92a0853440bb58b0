"""DeepSpeed ZeRO-1 / ZeRO-2 data parallel against a single-process reference, on CPU (gloo).

    torchrun --standalone --nproc_per_node=2 tests/dist_scripts/deepspeed_check.py --stages 1 2

Every rank builds the same tiny mHC model (same seed) and trains it for a few steps through
``wrap_deepspeed`` (the run's torch AdamW inside the engine, gradient clipping from our config,
grad accumulation 2) on its half of each global batch: rank r takes rows r, r + W, ... of the
batch, as PackedLoader shards. Rank 0 runs the same steps on the whole batch in one process
(plain model, AdamW, clip_grad_norm_) and compares the losses (mean over ranks) and, at the end,
every parameter. The routers' loads are summed over the ranks before the bias update, as the
trainer does. Prints one PASS / FAIL line per stage and ALL PASS; exit 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist

from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.parallel.data_parallel import wrap_deepspeed
from mhc_train.parallel.distributed import destroy_distributed, init_distributed
from mhc_train.residual import ResidualConfig
from mhc_train.train.optim import build_optimizer

STEPS, ACCUM, BATCH, SEQ, CLIP, LR = 3, 2, 4, 16, 0.5, 3e-3
LOSS_ATOL, PARAM_ATOL = 2e-5, 2e-5


def batches(vocab: int):
    g = torch.Generator().manual_seed(1)
    return [[torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g) for _ in range(ACCUM)] for _ in range(STEPS)]


def make_model():
    torch.manual_seed(0)
    return MHCTransformer(load_model_config("tiny"), ResidualConfig(variant="mhc"))


def optimizer(model):
    return build_optimizer(model, lr=LR, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1)


def reference(data):
    model = make_model()
    opt = optimizer(model)
    losses = []
    for micro in data:
        total = 0.0
        for seqs in micro:
            loss = model(seqs[:, :-1], seqs[:, 1:]).loss
            (loss / ACCUM).backward()
            total += float(loss.detach()) / ACCUM
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        model.update_router_biases()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, model


def deepspeed_run(data, stage: int, rank: int, world: int):
    model = make_model()
    wrapped = wrap_deepspeed(model, optimizer(model), torch.device("cpu"), micro_batch=BATCH // world,
                             grad_accum=ACCUM, grad_clip=CLIP, zero_stage=stage)
    engine = wrapped.engine
    losses = []
    for micro in data:
        total = torch.zeros(())
        for seqs in micro:
            mine = seqs[rank::world]
            loss = engine(mine[:, :-1], mine[:, 1:]).loss
            engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
            engine.step()  # an optimizer step only at the accumulation boundary
            total += loss.detach() / ACCUM
        dist.all_reduce(total)
        for moe in model.moe_layers():
            dist.all_reduce(moe.router.expert_load)
        model.update_router_biases()
        losses.append(float(total) / world)
    return losses, model


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_distributed(backend="gloo", device_type="cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches(load_model_config("tiny").vocab_size)
    ref_losses, ref_model = reference(data) if rank == 0 else (None, None)
    ok = True
    for stage in args.stages:
        losses, model = deepspeed_run(data, stage, rank, world)
        if rank == 0:
            loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
            ref_params = dict(ref_model.named_parameters())
            param_diff = max(float((p.detach() - ref_params[n].detach()).abs().max())
                             for n, p in model.named_parameters())
            bias_equal = all(torch.equal(a.router.expert_bias, b.router.expert_bias)
                             for a, b in zip(model.moe_layers(), ref_model.moe_layers()))
            good = loss_diff <= LOSS_ATOL and param_diff <= PARAM_ATOL and bias_equal
            ok &= good
            print(f"{'PASS' if good else 'FAIL'} zero{stage}: max |loss diff| {loss_diff:.3g}, "
                  f"max |param diff| {param_diff:.3g}, router biases equal {bias_equal}; "
                  f"losses {[round(x, 6) for x in losses]} vs {[round(x, 6) for x in ref_losses]}", flush=True)
    flag = torch.tensor([1.0 if ok else 0.0])
    dist.broadcast(flag, 0)
    if rank == 0:
        print("ALL PASS" if ok else "SOME FAIL", flush=True)
    # Both ranks leave together: a rank tearing gloo down while its peer still talks to it (e.g.
    # DeepSpeed's groups being released at exit) can abort the peer.
    del model
    gc.collect()
    dist.barrier()
    destroy_distributed()
    return 0 if flag.item() == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
