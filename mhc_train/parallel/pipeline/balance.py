"""Stage costs and balancing: blocks per stage from a per-token cost estimate, balanced per stage
or, for a V placement, per rank."""

from __future__ import annotations

import math
from typing import Sequence

from torch import nn

from mhc_train.model.moe import RoutedExperts
from mhc_train.model.transformer import MHCTransformer
from mhc_train.parallel.pipeline.config import _bad, check_stage_blocks

def block_cost(block: nn.Module, attention_context: float = 0.0) -> float:
    """Multiply-adds per token of one block: its matmul weights, routed experts at top-k / E,
    plus the attention score/value work against ``attention_context`` keys (0: ignored)."""
    cost = 0.0
    for module in block.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, RoutedExperts):
            parent_router = getattr(getattr(block, "ffn", None), "router", None)
            k = parent_router.top_k if parent_router is not None else 1
            e = module.w1.shape[0]
            own = own * k / e
        cost += own
    attn = getattr(block, "attn", None)
    if attention_context and attn is not None:
        cfg = attn.cfg if hasattr(attn, "cfg") else None
        if cfg is not None:
            cost += cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * attention_context
    return float(cost)


def model_costs(model: MHCTransformer, seq_len: int | None = None) -> tuple[list[float], float, float]:
    """(per-block costs, extra cost of the first stage, extra cost of the last stage).

    Per token: blocks as ``block_cost`` (average causal context seq_len / 2 when given); the
    embedding is a lookup (counted as C, its read); the head is a C x V matmul plus the final
    norm and the loss."""
    context = seq_len / 2 if seq_len else 0.0
    costs = [block_cost(b, context) for b in model.blocks]
    first = float(model.cfg.dim)
    last = float(model.head.weight.numel() + model.cfg.dim + model.cfg.vocab_size)
    return costs, first, last


def balance_stages(costs: Sequence[float], num_stages: int, first_extra: float = 0.0,
                   last_extra: float = 0.0) -> list[int]:
    """Blocks per stage (contiguous, >= 1 each) minimising the most expensive stage.

    Exact min-max linear partition by dynamic programming (O(stages x blocks^2), blocks are few);
    among equal optima the earliest split wins, so the result is deterministic."""
    n = len(costs)
    if num_stages < 1 or n < num_stages:
        _bad("stages_per_rank", f"{num_stages} stages need at least one block each, the model has {n} blocks")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))

    def stage_cost(k: int, i: int, j: int) -> float:  # stage k holds blocks i..j-1
        extra = (first_extra if k == 0 else 0.0) + (last_extra if k == num_stages - 1 else 0.0)
        return prefix[j] - prefix[i] + extra

    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, n - (num_stages - k) + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf:
                    continue
                value = max(best[k - 1][i], stage_cost(k - 1, i, j))
                if value < best[k][j] - 1e-9 * max(1.0, abs(value)):
                    best[k][j], cut[k][j] = value, i
    counts, j = [], n
    for k in range(num_stages, 0, -1):
        i = cut[k][j]
        counts.append(j - i)
        j = i
    return counts[::-1]


def balance_v_ranks(costs: Sequence[float], ranks: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[int]:
    """Blocks per stage for a V placement (rank r holds stages r and 2P-1-r): the most expensive
    RANK as cheap as possible, then, among those cuts, the most expensive stage. Both of a rank's
    stages run on one device and rank 0 also holds the embedding and the head, so balancing the
    stages one by one (``balance_stages``) leaves rank 0 the slowest.

    Exact, pairing stages from the outside in: pair r takes the next free blocks on the left
    (stage r) and on the right (stage 2P-1-r), the state (i, j) is the middle range still free, the
    innermost pair splits what is left. Two dynamic programmes over the O(P n^2) states, each
    step a vectorised minimum over the next state (i', j'): the smallest max rank cost R*, then
    the smallest max stage cost with every rank within R*."""
    import numpy as np

    n = len(costs)
    if ranks < 1 or n < 2 * ranks:
        _bad("stages_per_rank", f"{2 * ranks} stages need at least one block each, the model has {n} blocks")
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=np.float64))])
    span = prefix[None, :] - prefix[:, None]  # span[i, j] = cost of blocks [i, j)
    inf = np.inf

    def extras(r):
        return (first_extra, last_extra) if r == 0 else (0.0, 0.0)

    def innermost(cap):
        """(max rank cost, max stage cost, split) of the innermost pair on [i, j), ranks <= cap."""
        e_left, e_right = extras(ranks - 1)
        rank_cost = np.full((n + 1, n + 1), inf)
        stage_cost = np.full((n + 1, n + 1), inf)
        split = np.zeros((n + 1, n + 1), dtype=np.int64)
        for i in range(n - 1):
            for j in range(i + 2, n + 1):
                m = np.arange(i + 1, j)
                worst = np.maximum(span[i, m] + e_left, span[m, j] + e_right)
                k = int(np.argmin(worst))
                rank_cost[i, j] = span[i, j] + e_left + e_right
                if rank_cost[i, j] <= cap:
                    stage_cost[i, j], split[i, j] = worst[k], m[k]
        return rank_cost, stage_cost, split

    def outer(r, inner_value, cap, objective):
        """One pair further out: the best value of pairs r.. per state, and the (i', j') chosen."""
        need = 2 * (ranks - 1 - r)  # blocks the inner pairs need
        e_left, e_right = extras(r)
        table = np.full((n + 1, n + 1), inf)
        pick = np.zeros((n + 1, n + 1, 2), dtype=np.int64)
        for i in range(n + 1):
            for j in range(i + need + 2, n + 1):
                ip, jp = np.arange(i + 1, j)[:, None], np.arange(i + 1, j)[None, :]
                left, right = span[i, ip] + e_left, span[jp, j] + e_right
                pair_rank = left + right
                own = pair_rank if objective == "rank" else np.maximum(left, right)
                value = np.maximum(own, inner_value[ip, jp])
                value = np.where((jp - ip >= need) & (pair_rank <= cap), value, inf)
                k = int(np.argmin(value))
                table[i, j] = value.flat[k]
                pick[i, j] = (i + 1 + k // value.shape[1], i + 1 + k % value.shape[1])
        return table, pick

    # 1. the smallest max rank cost
    value = innermost(inf)[0]
    for r in range(ranks - 2, -1, -1):
        value = outer(r, value, inf, "rank")[0]
    cap = float(value[0, n]) * (1 + 1e-12)
    # 2. the smallest max stage cost with every rank within it
    _, value, split = innermost(cap)
    picks = {}
    for r in range(ranks - 2, -1, -1):
        value, picks[r] = outer(r, value, cap, "stage")
    left, right, i, j = [], [], 0, n
    for r in range(ranks - 1):
        ip, jp = (int(v) for v in picks[r][i, j])
        left.append(ip - i)
        right.append(j - jp)
        i, j = ip, jp
    m = int(split[i, j])
    left.append(m - i)
    right.append(j - m)
    return left + right[::-1]


def stage_block_ranges(counts: Sequence[int]) -> list[range]:
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


def plan_stage_blocks(model: MHCTransformer, num_stages: int, stage_blocks: Sequence[int] | None = None,
                      seq_len: int | None = None, balance: str = "stage") -> list[int]:
    """Blocks per stage: the explicit list when given (checked), else balanced by cost per stage
    (``balance="stage"``) or, for a V placement, per rank (``"rank"``, ``balance_v_ranks``)."""
    if stage_blocks is not None:
        return check_stage_blocks(stage_blocks, num_stages, len(model.blocks))
    costs, first, last = model_costs(model, seq_len)
    if balance == "rank":
        return balance_v_ranks(costs, num_stages // 2, first, last)
    return balance_stages(costs, num_stages, first, last)
