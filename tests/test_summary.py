"""Model summary: parameter counts vs the mHC paper's Table 5, FLOPs, stream memory, the CLI."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.model.info import main
from mhc_train.model.summary import (
    COMPONENTS,
    PAPER_TABLE5,
    PAPER_TABLE5_ROUNDING,
    build_meta_model,
    classify_parameters,
    flops_per_token,
    parameter_table,
    residual_parameter_detail,
    residual_stream_memory,
)
from mhc_train.residual import ResidualConfig

REPO = Path(__file__).resolve().parents[1]
BASELINE = ResidualConfig(variant="baseline", n=1)


def mhc_extra(cfg, n):
    """Parameters mHC adds over the baseline: per sublayer phi [nC, n^2+2n], alpha [3], bias [n^2+2n]."""
    width = n * n + 2 * n
    return cfg.n_sublayers * (n * cfg.dim * width + 3 + width)


@pytest.mark.parametrize("size", ["3b", "9b", "27b"])
def test_paper_table5_totals_and_active(size):
    cfg = load_model_config(size)
    model = build_meta_model(cfg, BASELINE)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    table = parameter_table(model)
    paper_total, paper_active = PAPER_TABLE5[size]
    total, active = table["total"]["total"], table["total"]["active"]
    assert abs(total - paper_total) / paper_total < 0.03, (size, total)
    assert abs(active - paper_active) / paper_active < 0.03, (size, active)
    # The convention that matches: the embedding lookup is not active, the head is.
    assert table["embedding"]["active"] == 0 and table["embedding"]["total"] == cfg.vocab_size * cfg.dim
    assert table["head"]["active"] == cfg.vocab_size * cfg.dim
    assert abs(active + table["embedding"]["total"] - paper_active) / paper_active > 0.03
    routed = table["routed_experts"]
    assert routed["active"] * cfg.n_routed_experts == routed["total"] * cfg.n_activated_experts
    assert table["residual"]["total"] == 0


@pytest.mark.parametrize("size", ["3b", "9b", "27b"])
def test_mhc_models_match_table5_to_its_printed_digits(size):
    # Table 5's figures are those of the mHC (n = 4) models: all six lie within half a unit of
    # the last printed digit (the baselines miss the active counts by 2.6M / 6.6M / 15M).
    table = parameter_table(build_meta_model(load_model_config(size), ResidualConfig(variant="mhc", n=4)))
    (paper_total, paper_active), (tol_total, tol_active) = PAPER_TABLE5[size], PAPER_TABLE5_ROUNDING[size]
    assert abs(table["total"]["total"] - paper_total) <= tol_total
    assert abs(table["total"]["active"] - paper_active) <= tol_active


@pytest.mark.parametrize("size,n", [("tiny", 4), ("3b", 4), ("27b", 4), ("9b", 8), ("small", 2)])
def test_mhc_adds_exactly_its_mapping_parameters(size, n):
    cfg = load_model_config(size)
    base = parameter_table(build_meta_model(cfg, BASELINE))
    mhc_model = build_meta_model(cfg, ResidualConfig(variant="mhc", n=n))
    mhc = parameter_table(mhc_model)
    extra = mhc_extra(cfg, n)
    assert mhc["total"]["total"] - base["total"]["total"] == extra
    assert mhc["residual"] == {"total": extra, "active": extra}
    for c in COMPONENTS:
        if c != "residual":
            assert mhc[c] == base[c], c
    width = n * n + 2 * n
    assert residual_parameter_detail(mhc_model) == {
        "phi": cfg.n_sublayers * n * cfg.dim * width,
        "alpha": cfg.n_sublayers * 3,
        "bias": cfg.n_sublayers * width,
    }


@pytest.mark.parametrize(
    "rcfg",
    [
        BASELINE,
        ResidualConfig(variant="hc", n=4, dynamic=True, contraction="learned"),
        ResidualConfig(variant="hc", n=3, dynamic=False),
        ResidualConfig(variant="mhc", n=4, contraction="learned"),
    ],
    ids=["baseline", "hc-dynamic", "hc-static", "mhc"],
)
def test_every_parameter_lands_in_one_component(rcfg):
    cfg = load_model_config("tiny", q_lora_rank=16)
    model = build_meta_model(cfg, rcfg)
    classes = classify_parameters(model)
    assert set(classes) == {name for name, _ in model.named_parameters()}
    assert set(classes.values()) <= set(COMPONENTS)
    table = parameter_table(model)
    assert sum(table[c]["total"] for c in COMPONENTS) == sum(p.numel() for p in model.parameters())
    assert table["total"]["total"] == sum(p.numel() for p in model.parameters())
    expected = {
        "embed.weight": "embedding",
        "head.weight": "head",
        "norm.weight": "norms",
        "blocks.0.attn_norm.weight": "norms",
        "blocks.0.attn.q_norm.weight": "norms",
        "blocks.0.attn.kv_norm.weight": "norms",
        "blocks.0.attn.wq_a.weight": "attention",
        "blocks.0.attn.wkv_b.weight": "attention",
        "blocks.2.attn.wo.weight": "attention",
        "blocks.0.ffn.w1.weight": "dense_ffn",
        "blocks.1.ffn.router.weight": "router",
        "blocks.1.ffn.experts.w2": "routed_experts",
        "blocks.2.ffn.shared.w3.weight": "shared_experts",
    }
    for name, component in expected.items():
        assert classes[name] == component, name
    if rcfg.variant == "hc" and rcfg.dynamic:
        assert classes["blocks.0.attn_conn.norm.weight"] == "residual"  # HC's own norm
        assert classes["blocks.1.ffn_conn.dynamic_alpha_fn"] == "residual"
    if rcfg.contraction == "learned":
        assert classes["contract.static_weight"] == "residual"


def test_unclassifiable_parameter_is_an_error():
    model = build_meta_model(load_model_config("tiny"), BASELINE)
    model.stray = nn.Parameter(torch.empty(3, device="meta"))
    with pytest.raises(ValueError, match="stray"):
        parameter_table(model)


@pytest.mark.parametrize("variant", ["baseline", "hc", "mhc"])
def test_meta_model_matches_the_real_one(variant):
    cfg = load_model_config("tiny", q_lora_rank=8)
    rcfg = ResidualConfig(variant=variant, n=1 if variant == "baseline" else 3, contraction="learned")
    real = MHCTransformer(cfg, rcfg)
    meta = build_meta_model(cfg, rcfg)
    for get in (nn.Module.named_parameters, nn.Module.named_buffers):
        shapes = lambda m: {k: (tuple(v.shape), v.dtype) for k, v in get(m)}  # noqa: E731
        assert shapes(meta) == shapes(real)
    assert all(t.is_meta for t in meta.parameters()) and all(t.is_meta for t in meta.buffers())


@pytest.mark.parametrize("size,variant", [("3b", "baseline"), ("27b", "mhc"), ("9b", "hc")])
def test_training_flops_are_about_six_times_active_params(size, variant):
    cfg = load_model_config(size)
    rcfg = ResidualConfig(variant=variant, n=1 if variant == "baseline" else 4)
    model = build_meta_model(cfg, rcfg)
    active = parameter_table(model)["total"]["active"]
    flops = flops_per_token(cfg, rcfg, seq_len=16, model=model)
    assert flops.training == pytest.approx(3 * flops.forward)
    ratio = flops.training / (6 * active)
    # Norm weights are active but no matmul; HC's dynamic maps run once per stream.
    assert 0.99 < ratio < 1.03, ratio


def test_matmul_and_attention_flops_equal_a_counted_forward():
    """Against torch's own FLOP counter on a real forward (an independent count, not the formula
    restated): the weight matmuls exactly; attention as the counter sees it, the full S x S
    score and value products, twice the formula's causal average. The baseline, whose connections
    hold no matmul (the mHC projection runs inside an opaque custom op the counter cannot see)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mhc_train.model.moe import RoutedExperts

    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    model = MHCTransformer(cfg, BASELINE)
    for m in model.modules():
        if isinstance(m, RoutedExperts):
            m.impl = "loop"  # per-expert linears, which the counter knows (not the grouped GEMM)
    b, s = 2, 64
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0)))
    counted = {str(op): f for op, f in counter.get_flop_counts()["Global"].items()}
    formula = flops_per_token(cfg, BASELINE, s)
    assert set(counted) == {"aten.mm", "aten.bmm"}, counted
    assert counted["aten.mm"] == formula.matmul * b * s
    assert counted["aten.bmm"] == 2 * formula.attention * b * s


def test_attention_and_connection_flops_follow_their_formulas():
    cfg = load_model_config("27b")
    rcfg = ResidualConfig(variant="mhc", n=4, t_max=20)
    model = build_meta_model(cfg, rcfg)
    short, long = (flops_per_token(cfg, rcfg, s, model=model) for s in (1024, 4096))
    per_token_per_position = cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    assert long.attention == pytest.approx(per_token_per_position * 4096)
    assert long.forward - short.forward == pytest.approx(per_token_per_position * 3072)
    n, c = 4, cfg.dim
    conn = cfg.n_sublayers * (2 * n * c + 2 * n * n * c + 2 * n * c + 4 * n * n * 20) + (n - 1) * c
    assert long.connections == pytest.approx(conn)
    # The phi projection is a matmul: mHC's matmul FLOPs exceed the baseline's by 2 x phi.
    base = flops_per_token(cfg, BASELINE, 4096)
    assert long.matmul - base.matmul == pytest.approx(2 * cfg.n_sublayers * n * c * (n * n + 2 * n))


def test_residual_stream_memory_27b():
    cfg = load_model_config("27b")
    mem = residual_stream_memory(cfg, ResidualConfig(variant="mhc", n=4))
    L, n, c = 60, 4, 2560
    assert mem.recompute_block == round(math.sqrt(n * L / (n + 2))) == 6
    assert mem.no_recompute_elements == n * c * L
    assert mem.recompute_elements == n * c * math.ceil(L / 6) + (n + 2) * c * 6
    assert mem.no_recompute_bytes == 2 * n * c * L
    assert mem.recompute_bytes < mem.no_recompute_bytes
    base = residual_stream_memory(cfg, BASELINE, bytes_per_element=4)
    assert base.n == 1 and base.no_recompute_bytes == 4 * c * L


def test_cli_prints_the_summary():
    proc = subprocess.run(
        [sys.executable, "-m", "mhc_train.model.info", "model=27b", "residual=mhc"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    model = build_meta_model(load_model_config("27b"), ResidualConfig(variant="mhc", n=4))
    table = parameter_table(model)
    assert str(table["total"]["total"]) in out and str(table["total"]["active"]) in out
    for text in ("paper Table 5", "relative diff", "training (3x)", "L_r*=6", "phi"):
        assert text in out, text
    # The printed counts against Table 5 as printed in the paper (27.0B total, 4.14B active; not
    # the module's own copy of them): within half a unit of the paper's last digit.
    total_line = next(line for line in out.splitlines() if line.split()[:1] == ["total"])
    total, active = (float(m) * 1e9 for m in re.findall(r"(\d+\.\d+)B", total_line))
    assert abs(total - 27.0e9) <= 0.05e9 and abs(active - 4.14e9) <= 0.005e9, (total, active)
    assert PAPER_TABLE5["27b"] == (27.0e9, 4.14e9)
    rounding = next(line for line in out.splitlines() if "within rounding" in line)
    assert rounding.split()[2:4] == ["yes", "yes"]


def test_cli_bad_key_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "mhc_train.model.info", "model=27b", "residual.nn=3"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "residual.nn" in lines[0], proc.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["model.n_layers=abc"], "model.n_layers"),
        (["model.n_layers=0"], "model.n_layers"),
        (["model=5b"], "model"),
        (["residual=xyz"], "residual"),
        (["residual.n=0"], "residual.n"),
        (["residual.t_max=1.5"], "residual.t_max"),
        (["residual.dynamic=maybe"], "residual.dynamic"),
        (["seq_len=100000"], "seq_len"),
        (["bogus=1"], "bogus"),
        (["model.n_layers"], "model.n_layers"),
    ],
)
def test_cli_bad_values_exit_2(capsys, args, needle):
    with pytest.raises(SystemExit) as exc:
        main(["model=tiny", "residual=mhc", *args])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_overrides_apply(capsys):
    main(["model=tiny", "residual=mhc", "residual.n=2", "residual.t_max=5", "model.n_layers=2", "seq_len=64"])
    out = capsys.readouterr().out
    cfg = load_model_config("tiny", n_layers=2)
    model = build_meta_model(cfg, ResidualConfig(variant="mhc", n=2, t_max=5))
    assert str(parameter_table(model)["total"]["total"]) in out
    assert "n=2 t_max=5" in out and "seq_len=64" in out
