"""``plan``: every layout of a cluster estimated, the fitting ones ranked (``rank_key``) and one
recommended; ``Plan`` holds the result."""

from __future__ import annotations

from dataclasses import dataclass

from mhc_train.model.config import ModelConfig
from mhc_train.parallel.planner.context import PlanContext
from mhc_train.parallel.planner.estimates import Estimate, estimate
from mhc_train.parallel.planner.layouts import PLAN_SCHEDULES, Cluster, enumerate_layouts
from mhc_train.residual.config import ResidualConfig

PAPER_GLOBAL_BATCH = {"3b": 320, "9b": 512, "27b": 1280}  # sequences of 4096 tokens, mHC Table 5


@dataclass
class Plan:
    model_name: str
    cluster: Cluster
    seq_len: int
    global_batch: int
    estimates: list[Estimate]  # fitting ones ranked first, then the rest by how far they miss
    recommended: Estimate | None
    parameters: int = 0  # of the whole model

    @property
    def fitting(self) -> list[Estimate]:
        return [e for e in self.estimates if e.fits]

    @property
    def misses(self) -> list[Estimate]:
        return [e for e in self.estimates if not e.fits]


def rank_key(e: Estimate):
    """Least communication time first; then less bubble, recomputation off, fewer bytes."""
    return (round(e.comm["time_s"], 9), round(e.bubble, 9), e.layout.recompute, e.bytes_per_gpu["total"])


def plan(model_cfg: ModelConfig, residual_cfg: ResidualConfig, cluster: Cluster, seq_len: int,
         global_batch: int, *, model_name: str = "custom", precision: str = "bf16",
         schedules=PLAN_SCHEDULES) -> Plan:
    """Every layout estimated: those that fit ranked by ``rank_key``, then the misses by total
    bytes; the recommendation is the best-ranked layout that fits with a busy pipeline."""
    cluster.validate()
    if not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"train.global_batch: must be an integer >= 1, got {global_batch!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"train.seq_len: must be an integer >= 1, got {seq_len!r}")
    ctx = PlanContext(model_cfg, residual_cfg, seq_len, global_batch, precision=precision)
    estimates = [estimate(ctx, cluster, lay) for lay in enumerate_layouts(ctx, cluster, schedules)]
    fitting = sorted((e for e in estimates if e.fits), key=rank_key)
    misses = sorted((e for e in estimates if not e.fits), key=lambda e: e.bytes_per_gpu["total"])
    recommended = next((e for e in fitting if e.busy), None)
    return Plan(model_name, cluster, seq_len, global_batch, fitting + misses, recommended, ctx.params.total)
