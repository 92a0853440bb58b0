"""Communication per GPU per step of one layout, and where its collective groups and pipeline
peers lie over the nodes (ranks laid out as the mesh builds them)."""

from __future__ import annotations

from functools import lru_cache

from mhc_train.parallel.mesh import MeshDegrees
from mhc_train.parallel.planner.context import PlanContext
from mhc_train.parallel.planner.layouts import GB, Cluster, Layout


def _fsdp_groups(shard: int, replicate: int) -> tuple[int, int]:
    """(ranks that shard, ranks that hold copies of each shard) of one parameter class, as
    ``ParallelMesh.data_mesh`` / ``expert_data_mesh`` build them: HSDP over (replicate, shard)
    whenever replicate > 1 (a shard size of 1 is plain replication), else FSDP over shard."""
    return shard, replicate


def _coords(rank: int, d: MeshDegrees) -> tuple[int, int, int, int]:
    """(pp, dp_replicate, dp_shard_mod_ep, ep) of a global rank: the mesh's row-major order."""
    e = rank % d.ep
    s = (rank // d.ep) % d.dp_shard_mod_ep
    r = (rank // (d.ep * d.dp_shard_mod_ep)) % d.dp_replicate
    p = rank // (d.ep * d.dp_shard_mod_ep * d.dp_replicate)
    return p, r, s, e


def _rank_of(p: int, r: int, s: int, e: int, d: MeshDegrees) -> int:
    return ((p * d.dp_replicate + r) * d.dp_shard_mod_ep + s) * d.ep + e


def _group(rank: int, d: MeshDegrees, dims: tuple[str, ...]) -> list[int]:
    """The ranks that differ from ``rank`` only along ``dims`` (names of MESH_DIMS)."""
    base = dict(zip(("pp", "dp_replicate", "dp_shard_mod_ep", "ep"), _coords(rank, d)))
    sizes = {"pp": d.pp, "dp_replicate": d.dp_replicate, "dp_shard_mod_ep": d.dp_shard_mod_ep, "ep": d.ep}
    members = [base]
    for dim in dims:
        members = [{**c, dim: i} for c in members for i in range(sizes[dim])]
    return [_rank_of(c["pp"], c["dp_replicate"], c["dp_shard_mod_ep"], c["ep"], d) for c in members]


def _shard_dims(shard_dims: tuple[str, ...], shard: int, replicate: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Mesh dims of the shard group and of the replicate group (``_fsdp_groups``'s rule)."""
    return (shard_dims if shard > 1 else ()), (("dp_replicate",) if replicate > 1 else ())



@lru_cache(maxsize=None)
def _topology(d: MeshDegrees, gpus_per_node: int, schedule: str | None) -> tuple:
    """Per global rank: (pp coordinate, whether each collective group spans nodes: non-expert
    shard, non-expert replicate, expert shard, expert replicate; ep peers on other nodes, ep peers
    on this node; per pipeline message, whether its peer is on another node)."""
    node = lambda g: g // gpus_per_node  # noqa: E731
    ne_dims = _shard_dims(("dp_shard_mod_ep", "ep"), d.dp_shard, d.dp_replicate)
    ex_dims = _shard_dims(("dp_shard_mod_ep",), d.dp_shard_mod_ep, d.dp_replicate)
    out = []
    for rank in range(d.world):
        c = _coords(rank, d)
        spans = [len({node(g) for g in _group(rank, d, dims)}) > 1 if dims else False
                 for dims in (*ne_dims, *ex_dims)]  # ne shard, ne replicate, ex shard, ex replicate
        peers = [g for g in _group(rank, d, ("ep",)) if g != rank]
        ep_far = sum(node(g) != node(rank) for g in peers)
        pp_far = tuple(node(_rank_of(q, c[1], c[2], c[3], d)) != node(rank)
                       for q in (_pp_sends(c[0], d.pp, schedule) if d.pp > 1 else ()))
        out.append((c[0], *spans, ep_far, len(peers) - ep_far, pp_far))
    return tuple(out)


def _communication(ctx: PlanContext, cluster: Cluster, lay: Layout, stages_of, moe_layers, disp_b: int,
                   comb_b: int, pe: int) -> dict[str, float]:
    """Bytes per GPU per step by kind and node locality, of the rank whose communication takes
    longest."""
    m, d = ctx.model_cfg, lay.degrees
    key = (d, lay.schedule, lay.micro_batch, lay.microbatches, lay.reshard, cluster)
    if key in ctx._comms:
        return ctx._comms[key]
    m_count, tokens_mb = lay.microbatches, lay.micro_batch * ctx.seq_len
    ne_shard, ne_rep = _fsdp_groups(d.dp_shard, d.dp_replicate)
    ex_shard, ex_rep = _fsdp_groups(d.dp_shard_mod_ep, d.dp_replicate)
    gathers = (m_count * 2 if lay.reshard else 1) if d.pp > 1 else m_count * (2 if lay.reshard else 1)
    message = tokens_mb * ctx.residual_cfg.streams * m.dim * 4  # [b, S, n, C] fp32, per micro-batch
    rank_params = ctx.rank_params(d.pp, lay.schedule, d.ep)
    n_moe_of = [sum(1 for s in stages for i in s.blocks if i in moe_layers) for stages in stages_of]
    best = None
    for p, *spans, ep_far, ep_near, pp_far in _topology(d, cluster.gpus_per_node, lay.schedule):
        ne, ex = rank_params[p]
        kinds = dict.fromkeys(("fsdp_allgather", "fsdp_reduce_scatter", "hsdp_allreduce", "ep_all_to_all",
                               "pp_p2p"), 0.0)
        where = {"intra": 0.0, "inter": 0.0}

        def add(kind, nbytes, far):
            kinds[kind] += nbytes
            where["inter" if far else "intra"] += nbytes

        shard_far = {"ne": spans[0], "ex": spans[2]}
        rep_far = {"ne": spans[1], "ex": spans[3]}
        for cls, count, shard, rep in (("ne", ne, ne_shard, ne_rep), ("ex", ex, ex_shard, ex_rep)):
            if shard > 1:
                add("fsdp_allgather", gathers * pe * count * (shard - 1) / shard, shard_far[cls])
                add("fsdp_reduce_scatter", 4 * count * (shard - 1) / shard, shard_far[cls])
            if rep > 1:
                add("hsdp_allreduce", 2 * 4 * count / shard * (rep - 1) / rep, rep_far[cls])
        n_moe = n_moe_of[p]
        if d.ep > 1 and n_moe:
            per_peer = m_count * n_moe * tokens_mb * m.n_activated_experts * m.dim * 2 * (disp_b + comb_b) / d.ep
            add("ep_all_to_all", per_peer * ep_far, True)
            add("ep_all_to_all", per_peer * ep_near, False)
        for far in pp_far:
            add("pp_p2p", m_count * message, far)
        intra, inter = where["intra"], where["inter"]
        time = intra / (cluster.intra_gbps * GB) + inter / (cluster.inter_gbps * GB)
        if best is None or time > best["time_s"]:
            best = {**kinds, "intra_node": intra, "inter_node": inter, "total": intra + inter, "time_s": time}
    ctx._comms[key] = best
    return best


def _pp_sends(p: int, pp: int, schedule: str) -> list[int]:
    """Pipeline ranks this rank sends to once per micro-batch (activations forward, gradients
    backward), one entry per message."""
    from mhc_train.parallel.pipeline import resolve_stages_per_rank, stage_to_rank

    spr = resolve_stages_per_rank(schedule, None)
    mapping = stage_to_rank(schedule, pp, spr)
    stages = pp * spr
    out = []
    for s, rank in mapping.items():
        if rank != p:
            continue
        if s + 1 < stages and mapping[s + 1] != p:
            out.append(mapping[s + 1])
        if s > 0 and mapping[s - 1] != p:
            out.append(mapping[s - 1])
    return out
