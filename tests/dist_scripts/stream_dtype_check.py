"""residual.stream_dtype in every layout, under bf16 (2 ranks, one torchrun launch).

For each layout (one process, DDP, FSDP, a pp=2 pipeline, DeepSpeed ZeRO-1) and each setting
(auto, float32) the trainer's layout is built from the same config and trains two steps of the
same batches under the trainer's bf16 step region. Required: every block receives streams of
the setting's dtype (auto: bf16, the autocast dtype), and every layout's losses are those of
one process within bf16 rounding. One line per case; exit 1 on any failure.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from mhc_train.model.weight_casts import step_region
from mhc_train.train.block_wrappers import blocks_of
from layout_builder import build_layout

LAYOUTS = {
    "single": ["parallel=single", "train.batch_size=4"],
    "ddp": ["parallel=ddp", "train.batch_size=2"],
    "fsdp": ["parallel=fsdp", "train.batch_size=2"],
    "pp2_1f1b": ["parallel=mesh", "parallel.pp=2", "train.batch_size=4", "parallel.pipeline.schedule=1f1b",
                 "parallel.pipeline.microbatches=2", "parallel.pipeline.stage_blocks=[2,2]"],
    "deepspeed": ["parallel=deepspeed", "train.batch_size=2", "parallel.zero_stage=1"],
}
EXPECTED = {"auto": torch.bfloat16, "float32": torch.float32}
TOLERANCE = 5e-3  # bf16 rounding: the layouts round weights and reductions in other places (seen: 1.1e-3)


def build(overrides: list[str]):
    # the one-process reference runs on each rank by itself (validation refuses single under torchrun)
    world = os.environ.pop("WORLD_SIZE") if "parallel=single" in overrides else None
    try:
        return build_layout(["model=tiny", "model.n_layers=4", "train.seq_len=16", "residual=mhc",
                             "train.precision=bf16", *overrides], bf16=True)
    finally:
        if world is not None:
            os.environ["WORLD_SIZE"] = world


def train(overrides: list[str], data) -> tuple[list[float], set]:
    model, layout = build(overrides)
    dtypes: set = set()
    for block in blocks_of(layout.optimized_module):
        block.register_forward_pre_hook(lambda m, args: dtypes.add(args[0].dtype))
    single = "parallel=single" in overrides  # the layout reads the data rank from the process group
    d, r = (1, 0) if single else (layout.dp_world_size, layout.dp_rank)
    losses = []
    for tokens in data:
        parts = layout.forward_backward([(tokens[r::d, :-1], tokens[r::d, 1:])], lambda: step_region("cpu"))
        losses.append(float(parts[0]))
        layout.update(1.0, allowed=True)
        layout.zero_grad()
    return losses, dtypes


def main() -> int:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 512, (4, 17), generator=gen) for _ in range(2)]
    ok = True
    for setting, expected in EXPECTED.items():
        ref = None
        for name, overrides in LAYOUTS.items():
            losses, dtypes = train([*overrides, f"residual.stream_dtype={setting}"], data)
            ref = ref or losses
            problems = []
            if dtypes != {expected}:
                problems.append(f"stream dtypes {sorted(map(str, dtypes))}, want {expected}")
            worst = max(abs(a - b) for a, b in zip(losses, ref))
            if worst > TOLERANCE:
                problems.append(f"losses differ from one process by {worst:.3g}")
            flags = torch.tensor([float(bool(problems))])
            dist.all_reduce(flags)
            ok &= flags.item() == 0
            if rank == 0:
                print(f"{'ok  ' if flags.item() == 0 else 'FAIL'} {setting:<8} {name:<10} losses "
                      f"{[f'{x:.5f}' for x in losses]} streams {sorted(map(str, dtypes))} {' '.join(problems)}",
                      flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
