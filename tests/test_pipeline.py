"""Pipeline parallelism: stage splitting, constraints, stage modules, and (through torchrun on
CPU/gloo) every schedule against a single-process reference."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.parallel.pipeline import (
    PipelineConfigError,
    PipelineStageModule,
    _InjectAuxLoss,
    balance_stages,
    balance_v_ranks,
    block_cost,
    lm_loss,
    local_stages,
    model_costs,
    plan_stage_blocks,
    stage_block_ranges,
    stage_to_rank,
    validate_pipeline,
)
from mhc_train.parallel.pipeline.overlap import OverlapFBHandler
from mhc_train.residual import ResidualConfig
from mhc_train.residual.recompute import RecomputePlan

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "pipeline_check.py"


def tiny(variant="mhc", recompute="off", **overrides):
    torch.manual_seed(0)
    cfg = load_model_config("tiny", **{"n_layers": 4, **overrides})
    return MHCTransformer(cfg, ResidualConfig(variant=variant, recompute=recompute)).train()


# ------------------------------------------------------------------------ stage balancing


def brute_force(costs, stages, first, last):
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = (0, *cuts, len(costs))
        loads = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
        loads[0] += first
        loads[-1] += last
        best = max(loads) if best is None else min(best, max(loads))
    return best


def test_balance_is_the_exact_min_max_partition():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        stages = rng.randint(1, n)
        costs = [rng.choice([1.0, 2.0, 3.5, 10.0]) for _ in range(n)]
        first, last = rng.choice([0.0, 4.0]), rng.choice([0.0, 7.0])
        counts = balance_stages(costs, stages, first, last)
        assert len(counts) == stages and sum(counts) == n and min(counts) >= 1
        ranges = stage_block_ranges(counts)
        loads = [sum(costs[i] for i in r) for r in ranges]
        loads[0] += first
        loads[-1] += last
        assert max(loads) == pytest.approx(brute_force(costs, stages, first, last))


def test_v_balance_is_the_exact_min_max_over_ranks_then_stages():
    """V placement (rank r holds stages r and 2P-1-r): the most expensive rank first, then the
    most expensive stage, against every cut."""
    rng = random.Random(1)
    for _ in range(150):
        ranks = rng.choice([1, 2, 3])
        stages, n = 2 * ranks, rng.randint(2 * ranks, 2 * ranks + 6)
        costs = [rng.choice([1.0, 2.0, 3.5, 10.0]) for _ in range(n)]
        first, last = rng.choice([0.0, 4.0]), rng.choice([0.0, 7.0])
        owner = stage_to_rank("dualpipev", ranks, 2)

        def score(counts):
            loads = [sum(costs[i] for i in r) for r in stage_block_ranges(counts)]
            loads[0] += first
            loads[-1] += last
            per_rank = [sum(v for s, v in enumerate(loads) if owner[s] == r) for r in range(ranks)]
            return max(per_rank), max(loads)

        counts = balance_v_ranks(costs, ranks, first, last)
        assert len(counts) == stages and sum(counts) == n and min(counts) >= 1
        best = min(score([b - a for a, b in zip((0, *cuts), (*cuts, n))])
                   for cuts in itertools.combinations(range(1, n), stages - 1))
        assert score(counts) == pytest.approx(best)


def _splits(n, stages):
    """Every way to cut n blocks into `stages` contiguous non-empty runs, as blocks per stage."""
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0, *cuts, n)
        yield [b - a for a, b in zip(bounds, bounds[1:])]


def _loads(counts, costs, first, last):
    """Cost of each stage: its blocks, plus the embedding on the first and the head on the last."""
    assert len(counts) >= 1 and all(isinstance(c, int) and c >= 1 for c in counts), counts
    assert sum(counts) == len(costs), counts  # contiguous runs covering every block once
    bounds = list(itertools.accumulate(counts, initial=0))
    loads = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
    loads[0] += first
    loads[-1] += last
    return loads


def _v_score(counts, costs, first, last):
    """(most expensive rank, most expensive stage) of a V placement: rank r holds stages r and
    2P-1-r (docs/pipeline.md)."""
    loads = _loads(counts, costs, first, last)
    S = len(loads)
    ranks = [loads[r] + loads[S - 1 - r] for r in range(S // 2)]
    return max(ranks), max(loads)


def test_v_schedules_can_balance_ranks_instead_of_stages():
    # The small model's profile (a cheaper dense first block, a head worth ~2 blocks), 2 ranks x 2
    # stages: per stage [2, 1, 2, 1] gives rank 0 (stages 0 and 3) 5.04 units against 3; per rank
    # [1, 2, 2, 1] gives 4.04 and 4 (measured on CPU: rank 0 had 27% more compute per step).
    costs, head = [0.98, 1, 1, 1, 1, 1], 2.06
    assert balance_stages(costs, 4, last_extra=head) == [2, 1, 2, 1]
    assert balance_v_ranks(costs, 2, last_extra=head) == [1, 2, 2, 1]
    assert _v_score([2, 1, 2, 1], costs, 0, head) == (pytest.approx(5.04), pytest.approx(3.06))
    assert _v_score([1, 2, 2, 1], costs, 0, head) == (pytest.approx(4.04), pytest.approx(3.06))


@pytest.mark.parametrize("overrides,seq_len", [
    ({"n_layers": 8}, None),
    ({"n_layers": 8}, 64),  # attention against the context adds to every block
    ({"n_layers": 7, "n_dense_layers": 3, "dense_ffn_dim": 512}, None),  # heavy dense blocks
    ({"n_layers": 7, "n_dense_layers": 3, "dense_ffn_dim": 512}, 1024),  # ... and long context
    ({"n_layers": 8, "vocab_size": 4096}, 512),  # a head worth 5 blocks' weights, 3 with context
])
def test_plan_stage_blocks_is_optimal_against_brute_force(overrides, seq_len):
    """plan_stage_blocks against every contiguous split of the model's blocks: per stage it
    minimises the most expensive stage; per rank (V placement) the most expensive rank, then the
    most expensive stage. Costs from model_costs (test_costs_count_routed_experts_at_top_k)."""
    model = tiny(**overrides)
    n = len(model.blocks)
    costs, first, last = model_costs(model, seq_len)
    for stages in range(1, min(n, 6) + 1):
        counts = plan_stage_blocks(model, stages, seq_len=seq_len)
        assert len(counts) == stages
        best = min(max(_loads(c, costs, first, last)) for c in _splits(n, stages))
        assert max(_loads(counts, costs, first, last)) == pytest.approx(best, rel=1e-9), (stages, counts)
    for ranks in range(1, n // 2 + 1):
        counts = plan_stage_blocks(model, 2 * ranks, seq_len=seq_len, balance="rank")
        assert len(counts) == 2 * ranks
        scores = [_v_score(c, costs, first, last) for c in _splits(n, 2 * ranks)]
        best_rank = min(r for r, _ in scores)
        best_stage = min(s for r, s in scores if r <= best_rank * (1 + 1e-9))
        assert _v_score(counts, costs, first, last) == (pytest.approx(best_rank, rel=1e-9),
                                                        pytest.approx(best_stage, rel=1e-9)), (ranks, counts)


def test_balance_examples():
    assert balance_stages([1.0] * 8, 4) == [2, 2, 2, 2]
    # A heavy head pushes blocks off the last stage, a heavy embedding off the first.
    assert balance_stages([1.0] * 8, 2, last_extra=4.0) == [6, 2]
    assert balance_stages([1.0] * 8, 2, first_extra=4.0) == [2, 6]
    with pytest.raises(PipelineConfigError, match="at least one block"):
        balance_stages([1.0] * 3, 4)


def test_costs_count_routed_experts_at_top_k():
    model = tiny()
    cfg = model.cfg
    costs, first, last = model_costs(model)
    dense, moe = model.blocks[0], model.blocks[1]
    assert not dense.is_moe and moe.is_moe
    routed = sum(p.numel() for p in moe.ffn.experts.parameters())
    total_moe = sum(p.numel() for p in moe.parameters())
    assert costs[1] == pytest.approx(total_moe - routed + routed * cfg.n_activated_experts / cfg.n_routed_experts)
    assert costs[0] == pytest.approx(sum(p.numel() for p in dense.parameters()))
    assert costs[1] == costs[2] == costs[3]
    assert last > first  # the head (C x V) outweighs the embedding lookup
    # Attention over the context adds h (d_qk + d_v) S / 2 per token.
    with_context = block_cost(moe, attention_context=64)
    assert with_context - costs[1] == pytest.approx(cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 64)


def test_explicit_stage_blocks_override_and_are_checked():
    model = tiny()
    assert plan_stage_blocks(model, 2, [1, 3]) == [1, 3]
    for bad, match in (([2, 1], "sum to 3"), ([1, 1, 2], "gives 3 stages"), ([0, 4], ">= 1")):
        with pytest.raises(PipelineConfigError, match=match):
            plan_stage_blocks(model, 2, bad)


@pytest.mark.parametrize("schedule,style", [("zbv", "v"), ("dualpipev", "v"), ("interleaved1f1b", "loop"),
                                            ("1f1b", "loop")])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_stage_to_rank_matches_torch(schedule, style, world_size):
    spr = 1 if schedule == "1f1b" else 2
    assert stage_to_rank(schedule, world_size, spr) == generate_stage_to_rank_mapping(world_size, world_size * spr,
                                                                                      style=style)
    if style == "v":  # rank 0 holds the first and the last stage
        assert local_stages(schedule, 0, world_size, 2) == [0, 2 * world_size - 1]


# ----------------------------------------------------------------------------- constraints


@pytest.mark.parametrize("kwargs,match", [
    (dict(schedule="pipedream"), "unknown schedule 'pipedream'"),
    (dict(schedule="gpipe", stages_per_rank=2), "gpipe runs exactly 1 stage per rank"),
    (dict(schedule="zbv", stages_per_rank=3), "zbv needs exactly 2 stages per rank"),
    (dict(schedule="dualpipev", stages_per_rank=1), "dualpipev needs exactly 2 stages per rank"),
    (dict(schedule="interleaved1f1b", stages_per_rank=1), "interleaved1f1b needs at least 2 stages per rank"),
    (dict(schedule="1f1b", n_microbatches=1), "1f1b needs at least as many micro-batches as stages: 1 < 2"),
    (dict(schedule="dualpipev", n_microbatches=3),
     r"dualpipev needs at least as many micro-batches as stages \(2 x 2 ranks = 4\), got 3"),
    (dict(schedule="interleaved1f1b", n_microbatches=5), r"multiple of its rounds .* = 2"),
    (dict(schedule="dualpipev", n_layers=3), "4 stages .* need at least one block each, but the model has 3 blocks"),
    (dict(schedule="1f1b", batch_size=6, n_microbatches=4), "batch of 6 sequences must split evenly into 4"),
    (dict(schedule="1f1b", stage_blocks=[3, 2]), "sum to 5, the model has 4"),
    (dict(schedule="gpipe", n_microbatches=0), "microbatches: must be an integer >= 1"),
])
def test_constraints_fail_at_start_with_one_message(kwargs, match):
    args = dict(schedule="1f1b", world_size=2, n_layers=4, n_microbatches=4, stages_per_rank=None, stage_blocks=None,
                batch_size=None)
    args.update(kwargs)
    with pytest.raises(PipelineConfigError, match=match) as info:
        validate_pipeline(**args)
    assert str(info.value).startswith("parallel.pipeline.")


def test_constraints_accept_what_torch_accepts():
    # Measured on CPU: ZBV runs with any number of micro-batches, interleaved with multiples of its rounds.
    assert validate_pipeline("zbv", 2, 4, 1) == ("zbv", 2)
    assert validate_pipeline("ZBVZeroBubble", 4, 8, 2) == ("zbv", 2)
    assert validate_pipeline("interleaved1f1b", 2, 6, 3, stages_per_rank=3) == ("interleaved1f1b", 3)
    assert validate_pipeline("DualPipeV", 2, 4, 4, batch_size=8) == ("dualpipev", 2)
    assert validate_pipeline("gpipe", 2, 3, 1) == ("gpipe", 1)


def test_overlap_concurrency_is_checked():
    with pytest.raises(ValueError, match="overlap_concurrency: must be one of"):
        OverlapFBHandler(concurrency="fast")


# --------------------------------------------------------------------------- stage modules


def chain(model, counts):
    ranges = stage_block_ranges(counts)
    return [PipelineStageModule(model, s, len(counts), ranges[s]) for s in range(len(counts))]


def test_stage_state_dicts_partition_the_model_under_its_names():
    model = tiny()
    stages = chain(model, [1, 2, 1])
    full = model.state_dict()
    seen = {}
    for stage in stages:
        for name, value in stage.state_dict().items():
            assert name in full, name
            assert value.data_ptr() == full[name].data_ptr()  # shared, not copied
            assert name not in seen
            seen[name] = stage.stage_index
    assert set(seen) == set(full)
    assert seen["embed.weight"] == 0 and seen["head.weight"] == 2 and seen["blocks.2.attn.wo.weight"] == 1


@pytest.mark.parametrize("variant", ["baseline", "mhc"])
@pytest.mark.parametrize("recompute", ["off", "2"])
def test_stage_chain_equals_the_model_bitwise(variant, recompute):
    # The stages run the model's own code on the same values: identical logits and gradients.
    tokens = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(1))
    ref_model = tiny(variant, "off")
    out = ref_model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    model = tiny(variant, recompute)
    x = tokens[:, :-1]
    pairs = []  # (stage input leaf, stage output)
    for stage in chain(model, [1, 2, 1]):
        if not stage.is_first:  # what the pipeline runtime does at a boundary: a fresh leaf
            x = x.detach().requires_grad_(True)
        y = stage(x)
        assert not y._is_view() and y.is_contiguous()  # p2p sends need the standard layout
        if not stage.is_last:
            assert y.shape == (2, 12, model.n_streams, model.cfg.dim)
        pairs.append((x, y))
        x = y
    assert torch.equal(x, out.logits)
    loss = lm_loss(x, tokens[:, 1:])
    assert torch.equal(loss, out.loss)
    loss.backward()
    for (_, y), (x_next, _) in zip(pairs[-2::-1], pairs[:0:-1]):  # boundary gradients, last to first
        y.backward(x_next.grad)
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_stage_input_gradient_has_the_standard_layout():
    # The runtime sends a stage input's gradient to the previous stage; the torch path's mHC read
    # returns it stored stream-major, and p2p sends need contiguous tensors.
    model = tiny("mhc", "off")
    stage = chain(model, [1, 2])[1]
    x = torch.randn(2, 5, model.n_streams, model.cfg.dim, requires_grad=True)
    (grad,) = torch.autograd.grad(stage(x).sum(), x)
    assert grad.is_contiguous()


def test_recompute_blocks_restart_at_the_stage_start():
    model = tiny("mhc", "3")
    stage = chain(model, [1, 3])[1]  # blocks 1..3 = sublayers 2..7
    plans = []
    original = PipelineStageModule.recompute_plan

    def capture(self):
        plan = original(self)
        plans.append(plan)
        return plan

    PipelineStageModule.recompute_plan = capture
    try:
        streams = torch.randn(1, 5, model.n_streams, model.cfg.dim, requires_grad=True)
        stage(streams).sum().backward()
    finally:
        PipelineStageModule.recompute_plan = original
    (plan,) = plans
    assert isinstance(plan, RecomputePlan)
    assert sorted(plan.blocks) == [2, 5]  # L_r = 3 counted from the stage's first sublayer
    # The stage input is the first block's x_l0 (behind an identity that fixes its gradient's layout).
    assert plan.blocks[2].input.data_ptr() == streams.data_ptr()


def test_balance_loss_is_injected_into_the_stage_backward():
    out = torch.randn(3, requires_grad=True)
    x = out * 2
    aux = (out ** 2).sum()
    y = _InjectAuxLoss.apply(x, aux)
    assert not y._is_view() and y.data_ptr() == x.data_ptr()
    y.sum().backward()
    assert torch.allclose(out.grad, 2 + 2 * out.detach())


# ------------------------------------------------------------------- distributed (torchrun)


def torchrun(nproc: int, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT),
           *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    summary = "\n".join(line for line in output.splitlines() if line.startswith(("PASS", "FAIL", "ALL", "SOME")))
    assert proc.returncode == 0 and "ALL PASS" in output, summary or output[-4000:]
    return summary


def test_all_schedules_match_single_process_on_2_ranks():
    # gpipe, 1f1b, interleaved1f1b, zbv, dualpipev (without and with the overlap handler, also its
    # threaded path) x baseline/mHC x recompute off/auto, plus HC, uneven stages, balance loss.
    summary = torchrun(2, "--suite", "full")
    assert summary.count("PASS ") == 30


def test_all_schedules_match_single_process_on_4_ranks():
    summary = torchrun(4, "--suite", "quick")
    assert summary.count("PASS ") == 7
