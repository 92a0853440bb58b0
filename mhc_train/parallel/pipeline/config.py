"""What a run chooses (PipelineConfig), the schedules by name and the constraints checked before
anything is built: stages per rank, micro-batch counts, explicit stage blocks, stage -> rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch.distributed.pipelining import (
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

SCHEDULE_CLASSES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved1f1b": ScheduleInterleaved1F1B,
    "zbv": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}
SCHEDULES = tuple(SCHEDULE_CLASSES)
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")  # one stage per rank
V_SCHEDULES = ("zbv", "dualpipev")  # two stages per rank in a V: rank 0 holds the first and the last


class PipelineConfigError(ValueError):
    """An impossible pipeline setup, named by its ``parallel.pipeline.<key>``."""


def _bad(key: str, reason: str):
    raise PipelineConfigError(f"parallel.pipeline.{key}: {reason}")


@dataclass
class PipelineConfig:
    """What a run chooses (the trainer's ``parallel.pipeline`` group)."""

    schedule: str = "1f1b"
    microbatches: int = 4  # per optimizer step; the batch is split evenly into them
    stages_per_rank: int | None = None  # None: 1 (gpipe, 1f1b) or 2 (interleaved1f1b, zbv, dualpipev)
    stage_blocks: list[int] | None = None  # blocks per stage (in stage order); None: balanced by cost
    balance: str = "stage"  # stage: the costliest stage as cheap as possible | rank: the costliest rank (V only)
    overlap: bool = True  # dualpipev: run paired F and B chunks through the overlap handler
    overlap_concurrency: str = "auto"  # auto (threads + streams on CUDA, sequential on CPU) | sequential | threads
    post_res_stream: bool = False  # CUDA: FFN post-res merge on a high-priority stream (paper 4.3.3)


# ------------------------------------------------------------------------- constraints


def normalize_schedule_name(name: str) -> str:
    key = str(name).lower().replace("-", "").replace("_", "")
    aliases = {"interleaved": "interleaved1f1b", "zbvzerobubble": "zbv", "zerobubblev": "zbv"}
    key = aliases.get(key, key)
    if key not in SCHEDULE_CLASSES:
        _bad("schedule", f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return key


def resolve_stages_per_rank(schedule: str, stages_per_rank: int | None) -> int:
    schedule = normalize_schedule_name(schedule)
    if stages_per_rank is None:
        return 1 if schedule in SINGLE_STAGE_SCHEDULES else 2
    if not isinstance(stages_per_rank, int) or isinstance(stages_per_rank, bool) or stages_per_rank < 1:
        _bad("stages_per_rank", f"must be an integer >= 1, got {stages_per_rank!r}")
    if schedule in SINGLE_STAGE_SCHEDULES and stages_per_rank != 1:
        _bad("stages_per_rank", f"{schedule} runs exactly 1 stage per rank, got {stages_per_rank} "
             "(use interleaved1f1b for several stages per rank)")
    if schedule in V_SCHEDULES and stages_per_rank != 2:
        _bad("stages_per_rank", f"{schedule} needs exactly 2 stages per rank (a V: rank 0 holds the first "
             f"and the last stage), got {stages_per_rank}")
    if schedule == "interleaved1f1b" and stages_per_rank < 2:
        _bad("stages_per_rank", "interleaved1f1b needs at least 2 stages per rank (with 1 it is 1f1b)")
    return stages_per_rank


def validate_pipeline(
    schedule: str,
    world_size: int,
    n_layers: int,
    n_microbatches: int,
    stages_per_rank: int | None = None,
    stage_blocks: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> tuple[str, int]:
    """Check a pipeline setup before anything is built; returns (schedule, stages_per_rank).

    Pre-empts what torch's schedules enforce (and what would otherwise fail deep inside a step)
    with one message naming the key: stages per rank of each schedule, every stage holding at
    least one block, micro-batch counts (1F1B and DualPipeV: >= stages; interleaved: a multiple of
    its rounds max(1, microbatches // ranks); see ``docs/pipeline.md``), and a batch that
    splits evenly into the micro-batches (every boundary tensor has one static shape).
    """
    schedule = normalize_schedule_name(schedule)
    if not isinstance(world_size, int) or world_size < 1:
        _bad("world_size", f"pipeline ranks must be >= 1, got {world_size!r}")
    spr = resolve_stages_per_rank(schedule, stages_per_rank)
    num_stages = world_size * spr
    if not isinstance(n_microbatches, int) or isinstance(n_microbatches, bool) or n_microbatches < 1:
        _bad("microbatches", f"must be an integer >= 1, got {n_microbatches!r}")
    if n_layers < num_stages:
        _bad("stages_per_rank", f"{num_stages} stages ({world_size} ranks x {spr}) need at least one block each, "
             f"but the model has {n_layers} blocks (model.n_layers)")
    if schedule == "1f1b" and n_microbatches < num_stages:
        _bad("microbatches", f"1f1b needs at least as many micro-batches as stages: {n_microbatches} < {num_stages}")
    if schedule == "dualpipev" and n_microbatches < num_stages:
        _bad("microbatches", f"dualpipev needs at least as many micro-batches as stages "
             f"(2 x {world_size} ranks = {num_stages}), got {n_microbatches}")
    if schedule == "interleaved1f1b":
        rounds = max(1, n_microbatches // world_size)
        if n_microbatches % rounds:
            _bad("microbatches", f"interleaved1f1b needs the micro-batches ({n_microbatches}) to be a multiple of "
                 f"its rounds max(1, microbatches // ranks) = {rounds}; e.g. use a multiple of {world_size}")
    if stage_blocks is not None:
        check_stage_blocks(stage_blocks, num_stages, n_layers)
    if batch_size is not None and (batch_size < n_microbatches or batch_size % n_microbatches):
        _bad("microbatches", f"the batch of {batch_size} sequences must split evenly into {n_microbatches} "
             "micro-batches (pipeline boundaries have one static shape)")
    return schedule, spr


def check_stage_blocks(stage_blocks: Sequence[int], num_stages: int, n_layers: int) -> list[int]:
    counts = list(stage_blocks)
    if len(counts) != num_stages:
        _bad("stage_blocks", f"gives {len(counts)} stages, the schedule has {num_stages}")
    if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in counts):
        _bad("stage_blocks", f"every stage needs an integer number of blocks >= 1, got {counts}")
    if sum(counts) != n_layers:
        _bad("stage_blocks", f"blocks per stage {counts} sum to {sum(counts)}, the model has {n_layers}")
    return counts


def stage_to_rank(schedule: str, world_size: int, stages_per_rank: int) -> dict[int, int]:
    """Global stage index -> pipeline rank: looped (stage s on rank s % P) or V-shaped."""
    schedule = normalize_schedule_name(schedule)
    num_stages = world_size * stages_per_rank
    if schedule in V_SCHEDULES:
        # V: down on stages 0..P-1, back up on P..2P-1, so rank 0 holds stage 0 and stage 2P-1.
        return {s: (s if s < world_size else 2 * world_size - 1 - s) for s in range(num_stages)}
    return {s: s % world_size for s in range(num_stages)}


def local_stages(schedule: str, rank: int, world_size: int, stages_per_rank: int) -> list[int]:
    mapping = stage_to_rank(schedule, world_size, stages_per_rank)
    return sorted(s for s, r in mapping.items() if r == rank)
