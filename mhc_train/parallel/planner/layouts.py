"""The cluster a plan is for (``Cluster``) and the layouts the mesh can build on it:
degrees, pipeline schedule, micro-batch size, recomputation and reshard_after_forward."""

from __future__ import annotations

from dataclasses import dataclass

from mhc_train.parallel.mesh import MeshConfigError, MeshDegrees, resolve_degrees
from mhc_train.parallel.planner.context import PlanContext

PLAN_SCHEDULES = ("1f1b", "zbv", "dualpipev")  # the pipeline runtime's schedules the simulator also has
GB = 1e9  # bandwidths and communicated bytes: decimal
GIB = 2**30  # GPU memory: an "80 GB" H100 reports 81559 MiB, so gpu_mem_gb counts GiB


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpu_mem_gb: float = 80.0  # GiB
    gpus_per_node: int = 8
    intra_gbps: float = 450.0  # GB/s per GPU inside a node (NVLink)
    inter_gbps: float = 50.0  # GB/s per GPU between nodes (a 400 Gb/s NIC per GPU)
    headroom: float = 0.10  # kept free for the CUDA context, NCCL buffers and allocator fragmentation
    tflops: float = 400.0  # achieved bf16 TFLOP/s per GPU, for the step-time estimate only
    max_bubble: float = 0.20  # a pipeline counts as busy when its bubble is at most this

    def validate(self) -> None:
        def bad(key, reason):
            raise ValueError(f"cluster.{key}: {reason}")

        if not isinstance(self.gpus, int) or isinstance(self.gpus, bool) or self.gpus < 1:
            bad("gpus", f"must be an integer >= 1, got {self.gpus!r}")
        if not isinstance(self.gpus_per_node, int) or isinstance(self.gpus_per_node, bool) or self.gpus_per_node < 1:
            bad("gpus_per_node", f"must be an integer >= 1, got {self.gpus_per_node!r}")
        for key in ("gpu_mem_gb", "intra_gbps", "inter_gbps", "tflops"):
            if not getattr(self, key) > 0:
                bad(key, f"must be > 0, got {getattr(self, key)!r}")
        if not 0 <= self.headroom < 1:
            bad("headroom", f"must be in [0, 1), got {self.headroom!r}")
        if not 0 <= self.max_bubble < 1:
            bad("max_bubble", f"must be in [0, 1), got {self.max_bubble!r}")

    @property
    def usable_bytes(self) -> float:
        return self.gpu_mem_gb * GIB * (1 - self.headroom)


@dataclass(frozen=True)
class Layout:
    degrees: MeshDegrees
    schedule: str | None  # None: no pipeline (pp = 1, micro-batches accumulate)
    micro_batch: int  # sequences per micro-batch
    microbatches: int  # per step and data rank
    recompute: bool
    reshard: bool | None  # FSDP2 reshard_after_forward; None where nothing is FSDP-sharded


def _divisors(x: int) -> list[int]:
    return [d for d in range(1, x + 1) if x % d == 0]



def enumerate_layouts(ctx: PlanContext, cluster: Cluster, schedules=PLAN_SCHEDULES) -> list[Layout]:
    """Every layout the mesh can build on ``cluster.gpus``: degrees that pass ``resolve_degrees``,
    pipelines that pass ``validate_pipeline`` for each schedule, micro-batches of 1, 2, 4, ...
    sequences that split the global batch evenly over the data ranks, recomputation off / on and,
    where FSDP shards, reshard_after_forward on / off."""
    from mhc_train.parallel.pipeline import V_SCHEDULES, PipelineConfigError, validate_pipeline

    m = ctx.model_cfg
    has_moe = m.n_layers > m.n_dense_layers
    out: list[Layout] = []
    for pp in _divisors(cluster.gpus):
        rest = cluster.gpus // pp
        for dp_replicate in _divisors(rest):
            dp_shard = rest // dp_replicate
            for ep in _divisors(dp_shard):
                try:
                    d = resolve_degrees(cluster.gpus, pp, dp_replicate, dp_shard, ep,
                                        n_routed_experts=m.n_routed_experts, has_moe=has_moe)
                except MeshConfigError:
                    continue
                shards = d.dp > 1
                reshards = (True, False) if shards else (None,)
                mb = 1
                while ctx.global_batch % (d.dp * mb) == 0:
                    micro = ctx.global_batch // (d.dp * mb)
                    for schedule in (schedules if pp > 1 else (None,)):
                        if schedule is not None:
                            try:
                                validate_pipeline(schedule, pp, m.n_layers, micro, batch_size=mb * micro)
                            except PipelineConfigError:
                                continue
                        # the split-backward schedules need the gathered weights kept (config.py refuses true)
                        allowed = (False,) if schedule in V_SCHEDULES and shards else reshards
                        for recompute in (False, True):
                            for reshard in allowed:
                                out.append(Layout(d, schedule, mb, micro, recompute, reshard))
                    mb *= 2
    return out
