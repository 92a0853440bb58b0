"""DeepSpeed ZeRO-1/2 state <-> the get_state_dict checkpoint format, on CPU (gloo), 2 ranks.

    torchrun --standalone --nproc_per_node=2 tests/dist_scripts/deepspeed_state_check.py

The tiny mHC model, 3 steps x grad_accum 2, clip 0.5, AdamW with two param groups (as the
trainer builds it); rank r trains on rows r, r + W, ... of each global batch. Rank 0 runs a
plain AdamW reference on the whole batches. For each ZeRO stage:

  state    after 2 steps, deepspeed_state_dicts has exactly the keys, nesting, dtypes, shapes and
           hyper-parameters of the reference's get_state_dict; values close (tolerances below);
  resume   saved with DCP, loaded into a fresh engine whose lr was zeroed (template from
           deepspeed_state_dicts, then load_deepspeed_state_dicts), trained step 3: bitwise equal
           to the engine trained 3 steps uninterrupted, and close to the reference's step 3;
  plain    (rank 0 alone) the DCP files loaded into a plain model + AdamW with set_state_dict:
           bitwise equal to what the DeepSpeed run saved; one more step close to the reference;
  no-grad  the model plus two parameters that never get a gradient (as HC's post maps under
           residual.fix_post): state dicts taken after step 1,
           loaded into a fresh engine, step 2 bitwise equal to uninterrupted; against the
           reference, equal where AdamW has state, and the extra entries (ZeRO steps them with a
           zero gradient) have zero moments.

Tolerances against the reference (fp32 sums taken in another order over the ranks): step and
router biases exact; moments 1e-3 relative to each tensor's largest entry (measured <= 2.6e-4;
absolute <= 8e-8); parameters 5e-5 absolute: Adam moves a weight by up to lr = 3e-3 per step
whatever its gradient's size, so an element whose gradient nearly cancels can differ by a small
fraction of lr (measured 3e-6 to 4e-5).
Prints one PASS / FAIL line per check and ALL PASS; exit 1 on a failure.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.parallel.data_parallel import wrap_deepspeed
from mhc_train.parallel.deepspeed_state import deepspeed_state_dicts, load_deepspeed_state_dicts
from mhc_train.parallel.distributed import destroy_distributed, init_distributed
from mhc_train.residual import ResidualConfig
from mhc_train.train.optim import build_optimizer

STEPS, ACCUM, BATCH, SEQ, CLIP, LR = 3, 2, 4, 16, 0.5, 3e-3
PARAM_ATOL, MOMENT_RTOL = 5e-5, 1e-3


def batches(vocab: int):
    g = torch.Generator().manual_seed(1)
    return [[torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g) for _ in range(ACCUM)] for _ in range(STEPS)]


def make_model(unused: bool = False):
    torch.manual_seed(0)
    model = MHCTransformer(load_model_config("tiny"), ResidualConfig(variant="mhc"))
    if unused:  # never in the forward: one per optimizer group (build_optimizer: "_bias" is not decayed)
        model.blocks[0].register_parameter("unused_bias", nn.Parameter(torch.randn(8)))
        # Decayed: ZeRO would shrink it (zero gradient, weight decay) where AdamW skips it; zero
        # stays zero, like HC's dynamic weights.
        model.blocks[0].register_parameter("unused_weight", nn.Parameter(torch.zeros(4, 8)))
    return model


def optimizer(model):
    return build_optimizer(model, lr=LR, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1)


def plain_step(model, opt, micro) -> None:
    for seqs in micro:
        (model(seqs[:, :-1], seqs[:, 1:]).loss / ACCUM).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    model.update_router_biases()
    opt.zero_grad(set_to_none=True)


def reference(data, unused: bool = False):
    """Plain AdamW in one process: get_state_dict after every step."""
    model = make_model(unused)
    opt = optimizer(model)
    states = []
    for micro in data:
        plain_step(model, opt, micro)
        states.append(clone(get_state_dict(model, opt)))
    return states


def engine_for(stage: int, world: int, unused: bool = False):
    model = make_model(unused)
    wrapped = wrap_deepspeed(model, optimizer(model), torch.device("cpu"), micro_batch=BATCH // world,
                             grad_accum=ACCUM, grad_clip=CLIP, zero_stage=stage)
    return wrapped.engine, model


def engine_step(engine, model, micro, rank: int, world: int) -> None:
    for seqs in micro:
        mine = seqs[rank::world]
        engine.backward(engine(mine[:, :-1], mine[:, 1:]).loss)
        engine.step()  # an optimizer step only at the accumulation boundary
    for moe in model.moe_layers():
        dist.all_reduce(moe.router.expert_load)
    model.update_router_biases()


def clone(x):
    """A deep copy: state dicts share storage with the live model (buffers) and optimizer."""
    if isinstance(x, dict):
        return {k: clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(clone(v) for v in x)
    return x.detach().clone() if torch.is_tensor(x) else x


def structure(x):
    """Everything but the tensors' values: keys, nesting, dtypes, shapes, plain values."""
    if isinstance(x, dict):
        return {k: structure(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(structure(v) for v in x)
    return ("tensor", x.dtype, tuple(x.shape)) if torch.is_tensor(x) else x


def max_diff(a, b) -> float:
    """Largest |a - b| over all tensors of two nested state dicts with the same keys."""
    if isinstance(b, dict):
        return max((max_diff(a[k], v) for k, v in b.items()), default=0.0)
    if isinstance(b, (list, tuple)):
        return max((max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return float((a.double() - b.double()).abs().max()) if torch.is_tensor(b) and b.numel() else 0.0


def against_reference(got, ref) -> tuple[bool, str]:
    """(model_sd, optim_sd) against the reference's, over the reference's keys."""
    (model_sd, optim_sd), (ref_model, ref_optim) = got, ref
    params = max(max_diff(model_sd[k], v) for k, v in ref_model.items() if not k.endswith("expert_bias"))
    biases = max(max_diff(model_sd[k], v) for k, v in ref_model.items() if k.endswith("expert_bias"))
    moments = moments_abs = steps = 0.0
    for name, state in ref_optim["state"].items():
        for key, value in state.items():
            diff = max_diff(optim_sd["state"][name][key], value)
            if key == "step":
                steps = max(steps, diff)
            else:
                moments_abs = max(moments_abs, diff)
                moments = max(moments, diff / float(value.abs().max().clamp_min(1e-30)))
    good = params <= PARAM_ATOL and moments <= MOMENT_RTOL and steps == 0.0 and biases == 0.0
    return good, (f"max |param diff| {params:.3g}, moments max |diff| {moments_abs:.3g} (relative {moments:.3g}), "
                  f"step diff {steps:.3g}, router bias diff {biases:.3g}")


def report(ok: bool, name: str, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


def shared_tmpdir(rank: int) -> str:
    path = [tempfile.mkdtemp(prefix="ds-state-") if rank == 0 else None]
    dist.broadcast_object_list(path, 0)
    return path[0]


def check_stage(stage: int, data, ref, rank: int, world: int, root: str) -> bool:
    ckpt = os.path.join(root, f"zero{stage}")
    engine, model = engine_for(stage, world)
    for micro in data[:2]:
        engine_step(engine, model, micro, rank, world)
    saved = deepspeed_state_dicts(engine, model)
    dcp.save(dict(zip(("model", "optim"), saved)), checkpoint_id=ckpt)
    saved = clone(saved)
    engine_step(engine, model, data[2], rank, world)
    uninterrupted = deepspeed_state_dicts(engine, model)

    fresh, fresh_model = engine_for(stage, world)
    tensors = dict(zip(("model", "optim"), deepspeed_state_dicts(fresh, fresh_model)))  # the template
    for group in fresh.optimizer.param_groups:
        group["lr"] = 0.0  # the load must restore the hyper-parameters too
    dcp.load(tensors, checkpoint_id=ckpt)
    load_deepspeed_state_dicts(fresh, fresh_model, tensors["model"], tensors["optim"])
    engine_step(fresh, fresh_model, data[2], rank, world)
    resumed = deepspeed_state_dicts(fresh, fresh_model)

    ok = True
    if rank == 0:
        same = structure(saved) == structure(ref[1])
        good, detail = against_reference(saved, ref[1])
        ok &= report(same and good, f"zero{stage} state",
                     f"after 2 steps: structure == get_state_dict's {same}; vs reference: {detail}")
        exact = max_diff(resumed, uninterrupted)
        good, detail = against_reference(resumed, ref[2])
        ok &= report(exact == 0.0 and good, f"zero{stage} resume",
                     f"DCP save, fresh engine, load, step 3: max |diff| vs uninterrupted engine {exact:.3g}; "
                     f"vs reference: {detail}")
        ok &= check_plain(ckpt, saved, data, ref, stage)
    del engine, fresh
    gc.collect()
    return ok


def check_plain(ckpt: str, saved, data, ref, stage: int) -> bool:
    """The DeepSpeed run's files into a plain model + AdamW, in this process alone."""
    model = make_model()
    opt = optimizer(model)
    model_sd, optim_sd = get_state_dict(model, opt)  # initialises the optimizer state
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt, no_dist=True)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    exact = max_diff(get_state_dict(model, opt), saved)
    plain_step(model, opt, data[2])
    good, detail = against_reference(get_state_dict(model, opt), ref[2])
    return report(exact == 0.0 and good, f"zero{stage} plain",
                  f"DCP -> plain AdamW: max |diff| vs saved {exact:.3g}; step 3 vs reference: {detail}")


def check_no_grad_params(stage: int, data, rank: int, world: int) -> bool:
    engine, model = engine_for(stage, world, unused=True)
    engine_step(engine, model, data[0], rank, world)
    saved = clone(deepspeed_state_dicts(engine, model))
    engine_step(engine, model, data[1], rank, world)
    uninterrupted = deepspeed_state_dicts(engine, model)
    fresh, fresh_model = engine_for(stage, world, unused=True)
    load_deepspeed_state_dicts(fresh, fresh_model, *saved)
    engine_step(fresh, fresh_model, data[1], rank, world)
    resumed = deepspeed_state_dicts(fresh, fresh_model)
    ok = True
    if rank == 0:
        exact = max_diff(resumed, uninterrupted)
        ref_model, ref_optim = reference(data[:2], unused=True)[-1]
        good, detail = against_reference(uninterrupted, (ref_model, ref_optim))
        extra = sorted(set(uninterrupted[1]["state"]) - set(ref_optim["state"]))
        zero = all(float(uninterrupted[1]["state"][n][k].abs().max()) == 0.0
                   for n in extra for k in ("exp_avg", "exp_avg_sq"))
        ok = report(exact == 0.0 and good and extra == ["blocks.0.unused_bias", "blocks.0.unused_weight"] and zero,
                    f"zero{stage} no-grad", f"resumed after step 1 vs uninterrupted {exact:.3g}; "
                    f"extra entries {extra} with zero moments {zero}; vs reference: {detail}")
    del engine, fresh
    gc.collect()
    return ok


def main() -> int:
    torch.set_num_threads(1)
    init_distributed(backend="gloo", device_type="cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches(load_model_config("tiny").vocab_size)
    ref = reference(data) if rank == 0 else None
    root = shared_tmpdir(rank)
    ok = True
    for stage in (1, 2):
        ok &= check_stage(stage, data, ref, rank, world, root)
        ok &= check_no_grad_params(stage, data, rank, world)
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    flag = torch.tensor([1.0 if ok else 0.0])
    dist.broadcast(flag, 0)
    if rank == 0:
        print("ALL PASS" if flag.item() == 1.0 else "SOME FAIL", flush=True)
    # Both ranks leave together: a rank tearing gloo down while its peer still talks to it can
    # abort the peer (seen once in ten runs on CPU).
    gc.collect()
    dist.barrier()
    destroy_distributed()
    return 0 if flag.item() == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
