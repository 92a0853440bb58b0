"""residual.stream_dtype in every layout, under bf16 (2 ranks, one torchrun launch).

For each layout (one process, DDP, FSDP eager and with compiled blocks (aot_eager), a pp=2
pipeline, DeepSpeed ZeRO-1 with fp32 weights and with DeepSpeed's bf16 weights) and each setting (auto, float32) the trainer's layout is built
from the same config and trains two steps of the same batches under the trainer's bf16 step
region. Required: every block receives streams of the setting's dtype (auto: bf16, the autocast
dtype); the first step's loss and gradient norm are one process's up to the order of sums (the
same numerics: fp32 mappings, the same dtypes everywhere), except with DeepSpeed's bf16 weights,
which compute on bf16 weights by choice; every layout's losses stay within bf16 rounding of one
process. One line per case; exit 1 on any failure.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("MHC_COMPILE_BACKEND", "aot_eager")  # compiles in seconds on a CPU; inductor is opt-in
import torch
import torch.distributed as dist

from mhc_train.weight_casts import step_region
from mhc_train.train.block_wrappers import blocks_of
from layout_builder import build_layout

LAYOUTS = {
    "single": ["parallel=single", "train.batch_size=4"],
    "ddp": ["parallel=ddp", "train.batch_size=2"],
    "fsdp": ["parallel=fsdp", "train.batch_size=2"],
    # FSDP in bf16 with compiled blocks: compiled around the routers' and connections' own groups
    "fsdp_compiled": ["parallel=fsdp", "train.batch_size=2", "train.compile=true"],
    "pp2_1f1b": ["parallel=mesh", "parallel.pp=2", "train.batch_size=4", "parallel.pipeline.schedule=1f1b",
                 "parallel.pipeline.microbatches=2", "parallel.pipeline.stage_blocks=[2,2]"],
    "deepspeed": ["parallel=deepspeed", "train.batch_size=2", "parallel.zero_stage=1"],
    "ds_bf16_weights": ["parallel=deepspeed", "train.batch_size=2", "parallel.zero_stage=1",
                        "parallel.deepspeed_weights=bf16"],
}
OWN_NUMERICS = {"ds_bf16_weights"}  # bf16 weights: not held to step 1's equality
EXPECTED = {"auto": torch.bfloat16, "float32": torch.float32}
# Step 1 runs every layout's forward on the same initial weights: the same numerics give the same
# loss (seen: equal to 4e-7) and the same gradient norm up to the order of fp32 sums and the
# batch's split into bf16 pieces (seen: 5e-6 relative among the layouts splitting the batch over
# the ranks, 1.7e-5 for the pipeline's micro-batches against one process, 3.6e-5 for 2 rows per
# rank against 4, hence DDP as those layouts' reference). Mutations caught: FSDP with the
# connections gathered in bf16 (loss 2.4e-5 off, norm 1.1e-4), DeepSpeed's bf16 weights (loss
# 1.3e-5 / 8e-5 off). Later steps add the update, whose AdamW step (lr 1e-2) turns the last bits
# of a near-zero gradient into a full step.
FIRST_STEP, FIRST_NORM = 1e-5, 5e-5
# compiled blocks: AOT autograd's decomposed backward rounds bf16 elsewhere (seen 5.2e-5 in norm)
NORM_TOLERANCE = {"fsdp_compiled": 2e-4}
# the gradient norm's reference: DDP (its own) for the layouts that split the batch over the ranks
NORM_REFERENCE = {"ddp": "ddp", "fsdp": "ddp", "fsdp_compiled": "ddp", "deepspeed": "ddp"}  # else one process
TOLERANCE = 5e-3  # every step (seen: 1.1e-3)


def build(overrides: list[str]):
    # the one-process reference runs on each rank by itself (validation refuses single under torchrun)
    world = os.environ.pop("WORLD_SIZE") if "parallel=single" in overrides else None
    try:
        return build_layout(["model=tiny", "model.n_layers=4", "train.seq_len=16", "residual=mhc",
                             # a random phi (not the zero default), so that a bf16 copy of it shows
                             "residual.phi_init_std=0.02", "train.precision=bf16", *overrides], bf16=True)
    finally:
        if world is not None:
            os.environ["WORLD_SIZE"] = world


def train(overrides: list[str], data) -> tuple[list[float], list[float], set]:
    model, layout = build(overrides)
    dtypes: set = set()
    for block in blocks_of(layout.optimized_module):
        block.register_forward_pre_hook(lambda m, args: dtypes.add(args[0].dtype))
    single = "parallel=single" in overrides  # the layout reads the data rank from the process group
    d, r = (1, 0) if single else (layout.dp_world_size, layout.dp_rank)
    losses, norms = [], []
    for tokens in data:
        parts = layout.forward_backward([(tokens[r::d, :-1], tokens[r::d, 1:])], lambda: step_region("cpu"))
        losses.append(float(parts[0]))
        norms.append(layout.update(1.0, allowed=True)[0])
        layout.zero_grad()
    return losses, norms, dtypes


def main() -> int:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 512, (4, 17), generator=gen) for _ in range(2)]
    ok = True
    for setting, expected in EXPECTED.items():
        runs = {}
        for name, overrides in LAYOUTS.items():
            losses, norms, dtypes = train([*overrides, f"residual.stream_dtype={setting}"], data)
            runs[name] = losses, norms
            ref, norm_ref = runs["single"][0], runs[NORM_REFERENCE.get(name, "single")][1]
            problems = []
            if dtypes != {expected}:
                problems.append(f"stream dtypes {sorted(map(str, dtypes))}, want {expected}")
            first, first_norm = abs(losses[0] - ref[0]), abs(norms[0] / norm_ref[0] - 1)
            if name not in OWN_NUMERICS and (first > FIRST_STEP or first_norm > NORM_TOLERANCE.get(name, FIRST_NORM)):
                problems.append(f"step 1 differs from one process: loss by {first:.3g}, grad norm by {first_norm:.3g}")
            worst = max(abs(a - b) for a, b in zip(losses, ref))
            if worst > TOLERANCE:
                problems.append(f"losses differ from one process by {worst:.3g}")
            flags = torch.tensor([float(bool(problems))])
            dist.all_reduce(flags)
            ok &= flags.item() == 0
            if rank == 0:
                print(f"{'ok  ' if flags.item() == 0 else 'FAIL'} {setting:<8} {name:<10} losses "
                      f"{[f'{x:.7f}' for x in losses]} grad norms {[f'{x:.7f}' for x in norms]} streams {sorted(map(str, dtypes))} {' '.join(problems)}",
                      flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
