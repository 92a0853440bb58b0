"""One layout's estimate (``estimate``): bytes per GPU by part on the worst pipeline rank, its
communication (``comm``), bubble and step time."""

from __future__ import annotations

from dataclasses import dataclass

from mhc_train.parallel.planner.activations import logits_transient_bytes, recompute_transient_bytes
from mhc_train.parallel.planner.comm import _communication, _fsdp_groups
from mhc_train.parallel.planner.context import PlanContext
from mhc_train.parallel.planner.layouts import Cluster, Layout

MEMORY_PARTS = ("params", "params_unsharded", "grads", "grad_accumulation", "optimizer", "activations",
                "activations_in_flight", "all_to_all", "transient")


@dataclass
class Estimate:
    layout: Layout
    bytes_per_gpu: dict[str, float]  # MEMORY_PARTS + total, of the worst pipeline rank
    worst_rank: int  # the pipeline rank that needs the most memory
    fits: bool
    comm: dict[str, float]  # bytes per GPU per step by kind, intra / inter node, seconds
    bubble: float
    busy: bool  # the pipeline's bubble is at most cluster.max_bubble (always, without a pipeline)
    compute_s: float  # step compute at cluster.tflops, bubble included
    step_s: float  # compute_s + comm seconds (no overlap)

    def to_json(self) -> dict:
        lay = self.layout
        d = lay.degrees
        return {
            "degrees": {"pp": d.pp, "dp_replicate": d.dp_replicate, "dp_shard": d.dp_shard, "ep": d.ep},
            "schedule": lay.schedule, "micro_batch": lay.micro_batch, "microbatches": lay.microbatches,
            "recompute": lay.recompute, "reshard_after_forward": lay.reshard,
            "bytes_per_gpu": {k: int(round(v)) for k, v in self.bytes_per_gpu.items()},
            "worst_rank": self.worst_rank, "fits": self.fits,
            "comm": {k: (round(v, 4) if k.endswith("_s") else int(round(v))) for k, v in self.comm.items()},
            "bubble": round(self.bubble, 4), "busy": self.busy,
            "compute_s": round(self.compute_s, 3), "step_s": round(self.step_s, 3),
        }



def estimate(ctx: PlanContext, cluster: Cluster, lay: Layout) -> Estimate:
    """Bytes per GPU (worst pipeline rank) and communication per GPU per step of one layout."""
    m, r = ctx.model_cfg, ctx.residual_cfg
    d = lay.degrees
    prec = ctx.precision
    pe = 2 if prec == "bf16" else 4  # compute copies of the weights
    tokens_mb = lay.micro_batch * ctx.seq_len
    m_count = lay.microbatches
    recompute = "auto" if lay.recompute else None

    ne_shard, ne_rep = _fsdp_groups(d.dp_shard, d.dp_replicate)
    ex_shard, ex_rep = _fsdp_groups(d.dp_shard_mod_ep, d.dp_replicate)
    stages_of = ctx.rank_stages(d.pp, lay.schedule)
    if d.pp > 1:
        bubble, peaks = ctx.simulation(lay.schedule, d.pp, m_count)
    else:
        bubble, peaks = 0.0, [1]
    moe_layers = [i for i in range(m.n_layers) if i >= m.n_dense_layers]
    k, c = m.n_activated_experts, m.dim
    disp_b = 4  # the normed sublayer input is fp32 under autocast too
    comb_b = 2 if prec == "bf16" else 4

    worst = None
    rank_bytes = []
    for pr, stages in enumerate(stages_of):
        ne, ex = ctx.rank_params(d.pp, lay.schedule, d.ep)[pr]  # ex: this rank's E / ep experts
        sharded = ne / ne_shard + ex / ex_shard
        parts = dict.fromkeys(MEMORY_PARTS, 0.0)
        parts["params"] = 4 * sharded
        parts["grads"] = 4 * sharded
        parts["optimizer"] = 8 * sharded
        # unsharded compute copies
        block_sizes = [ctx.params.blocks[i][0] * (ne_shard > 1) + ctx.params.blocks[i][1] / d.ep * (ex_shard > 1)
                       for s in stages for i in s.blocks]
        root = sum(ctx.params.first for s in stages if s.first) + sum(ctx.params.last for s in stages if s.last)
        ne_fsdp = ne if ne_shard > 1 else 0.0
        ex_fsdp = ex if ex_shard > 1 else 0.0
        if d.pp > 1 or not lay.reshard:
            gathered = ne_fsdp + ex_fsdp  # the whole rank stays gathered between forward and backward
        else:
            gathered = 2 * max(block_sizes, default=0.0) + (root if ne_shard > 1 else 0.0)
        unsharded = pe * gathered
        if prec == "bf16" and ne_shard > 1:  # FSDP gathers the embedding in fp32 (streams stay fp32)
            unsharded += 2 * sum(ctx.params.first for s in stages if s.first)
        if prec == "bf16":
            if ne_shard == 1:
                unsharded += 2 * ne  # autocast's cached bf16 casts, one per step
            if ex_shard == 1:  # the experts' explicit casts, one per micro-batch in flight
                unsharded += 2 * ex * max(peaks[pr] if d.pp > 1 else 1, 1) / max(len(stages), 1)
        if m_count > 1:  # FSDP2 accumulates unsharded fp32 gradients until the step's reduce-scatter
            parts["grad_accumulation"] = 4 * (ne_fsdp + ex_fsdp)
        elif ne_shard > 1 or ex_shard > 1:
            unsharded += 4 * max(block_sizes, default=0.0)  # one block's gradient before its reduce-scatter
        parts["params_unsharded"] = unsharded
        # activations
        one_mb = ctx.rank_activation_bytes(stages, recompute, d.pp > 1).total * tokens_mb
        in_flight_units = peaks[pr] if d.pp > 1 else 1
        parts["activations"] = one_mb
        parts["activations_in_flight"] = max(0.0, in_flight_units * one_mb / len(stages) - one_mb)
        rank_moe = [i for s in stages for i in s.blocks if i in moe_layers]
        if d.ep > 1 and rank_moe:
            overlapped = 2 if lay.schedule == "dualpipev" else 1
            parts["all_to_all"] = tokens_mb * k * c * (2 * disp_b + 2 * comb_b) * overlapped
        transients = [recompute_transient_bytes(m, r, prec, recompute) * tokens_mb]
        if any(s.last for s in stages):
            transients.append(logits_transient_bytes(m) * tokens_mb)
        parts["transient"] = max(transients)
        parts["total"] = sum(parts[p] for p in MEMORY_PARTS)
        rank_bytes.append(parts)
        if worst is None or parts["total"] > rank_bytes[worst]["total"]:
            worst = pr

    comm = _communication(ctx, cluster, lay, stages_of, moe_layers, disp_b, comb_b, pe)
    fwd_flops = _forward_flops_per_token(ctx)
    recompute_extra = _connection_flops(ctx) if lay.recompute else 0.0
    tokens_step = ctx.global_batch * ctx.seq_len
    compute = (3 * fwd_flops + recompute_extra) * tokens_step / (cluster.gpus * cluster.tflops * 1e12)
    compute /= (1 - bubble)
    busy = d.pp == 1 or bubble <= cluster.max_bubble
    parts = rank_bytes[worst]
    return Estimate(lay, parts, worst, parts["total"] <= cluster.usable_bytes, comm, bubble, busy,
                    compute, compute + comm["time_s"])


def _forward_flops_per_token(ctx: PlanContext) -> float:
    if not hasattr(ctx, "_fwd_flops"):
        from mhc_train.model.summary import flops_per_token

        ctx._fwd_flops = flops_per_token(ctx.model_cfg, ctx.residual_cfg, ctx.seq_len, model=ctx.model).forward
    return ctx._fwd_flops


def _connection_flops(ctx: PlanContext) -> float:
    from mhc_train.model.summary import connection_flops_per_token

    return connection_flops_per_token(ctx.model_cfg, ctx.residual_cfg)
