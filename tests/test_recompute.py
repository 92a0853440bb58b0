"""Selective recomputation of the residual-stream ops (paper Table 3, Eq 20)."""

import math

import pytest
import torch

from mhc_train.bench.memory_report import measure
from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.residual import ResidualConfig
from mhc_train.residual.recompute import RecomputePlan, optimal_block_size, parse_recompute


def grads_of(variant, recompute, boundaries=(0,), bf16=False, **rkw):
    torch.manual_seed(0)
    model = MHCTransformer(load_model_config("tiny", q_lora_rank=8), ResidualConfig(variant=variant, recompute=recompute, **rkw))
    model.recompute_boundaries = boundaries
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["baseline", "hc", "mhc"])
@pytest.mark.parametrize("recompute,boundaries", [("1", (0,)), ("auto", (0,)), ("4", (0,)), ("2", (0, 3))])
def test_gradients_bitwise_equal_with_recomputation(variant, recompute, boundaries):
    # The same ops run on the same values in the same order: fp32 on CPU gives identical bits.
    loss_ref, ref = grads_of(variant, "off")
    loss, got = grads_of(variant, recompute, boundaries)
    assert torch.equal(loss, loss_ref)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


@pytest.mark.parametrize("variant", ["hc", "mhc"])
def test_recomputation_under_bf16_autocast_restores_the_forwards_autocast(variant):
    """The recompute runs in backward, outside the forward's autocast region: it must re-enter it
    (HC crashed with a bf16/fp32 mismatch in addmv, and a silently fp32 recompute would differ)."""
    loss_ref, ref = grads_of(variant, "off", bf16=True)
    loss, got = grads_of(variant, "auto", bf16=True)
    assert torch.equal(loss, loss_ref)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_only_the_connection_ops_are_recomputed():
    torch.manual_seed(0)
    model = MHCTransformer(load_model_config("tiny"), ResidualConfig(variant="mhc", recompute="2"))
    calls = {"attn": 0, "ffn": 0, "conn": 0}
    for block in model.blocks:
        block.attn.register_forward_hook(lambda *a: calls.__setitem__("attn", calls["attn"] + 1))
        block.ffn.register_forward_hook(lambda *a: calls.__setitem__("ffn", calls["ffn"] + 1))
    original = type(model.blocks[0].attn_conn).read

    def counting_read(self, streams):
        calls["conn"] += 1
        return original(self, streams)

    type(model.blocks[0].attn_conn).read = counting_read
    try:
        tokens = torch.randint(0, 512, (2, 9))
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    finally:
        type(model.blocks[0].attn_conn).read = original
    assert calls["attn"] == 3 and calls["ffn"] == 3  # forward only
    assert calls["conn"] == 2 * 6  # every connection read once more in backward


def test_memory_saving_matches_table3():
    cfg = load_model_config("tiny")
    tokens = torch.randint(0, 512, (2, 33))
    per_token_layer = lambda b: b / (2 * 32) / cfg.n_sublayers  # noqa: E731
    kept = {}
    for setting in ("off", "auto", "1", "6"):
        torch.manual_seed(0)
        model = MHCTransformer(cfg, ResidualConfig(variant="mhc", n=4, recompute=setting))
        kept[setting] = per_token_layer(measure(model, tokens)["residual"])
        block = model.recompute_block_size()
        if block is not None:
            n, c, num = 4, cfg.dim, cfg.n_sublayers
            table3 = (n * c * math.ceil(num / block) + c * num) * 4 / num
            assert abs(kept[setting] / table3 - 1) < 0.10, (setting, kept[setting], table3)
    assert kept["auto"] < 0.5 * kept["off"]  # auto: L_r* = round(sqrt(4 * 6 / 6)) = 2
    assert kept["1"] > kept["auto"] > kept["6"]  # fewer blocks keep fewer x_l0 (peak aside)


def test_block_layout_and_eq20():
    assert optimal_block_size(4, 60) == 6  # sqrt(4 * 60 / 6) = 6.3
    assert optimal_block_size(4, 24) == 4
    assert optimal_block_size(1, 2) == 1
    plan = RecomputePlan(3, [], boundaries=(0, 5))
    assert [plan.block_start(i) for i in range(10)] == [0, 0, 0, 3, 3, 5, 5, 5, 8, 8]  # never crosses 5


def test_parse_and_bad_config():
    assert parse_recompute("off") is None and parse_recompute(None) is None
    assert parse_recompute("auto") == "auto" and parse_recompute(3) == 3 and parse_recompute("3") == 3
    for bad in ("-1", "0.5", "sometimes", -2):
        with pytest.raises(ValueError, match="recompute"):
            ResidualConfig(variant="mhc", recompute=bad)


def stage_like_forward(regions=None):
    """The blocks of a tiny mHC model (L_r = 2) on detached streams, as a pipeline stage runs
    them: (model, stage input, output, regions used)."""
    torch.manual_seed(0)
    model = MHCTransformer(load_model_config("tiny"), ResidualConfig(variant="mhc", recompute="2"))
    tokens = torch.randint(0, 512, (1, 9))
    streams = model.embed_streams(tokens).detach().requires_grad_(True)
    rope = model.rope(9, streams.device)
    regions = model.recompute_plan() if regions is None else regions
    out = streams
    for block in model.blocks:
        out = block(out, rope, regions)
    return model, streams, out, regions


def test_autograd_grad_with_inputs_works():
    # Pipeline schedules differentiate stage outputs with torch.autograd.grad(inputs=...): the
    # recompute hooks must work there too (reentrant checkpointing does not).
    from mhc_train.model.transformer import PLAIN_REGIONS

    _, streams, out, _ = stage_like_forward()
    (g_in,) = torch.autograd.grad(out.pow(2).sum(), [streams])
    _, ref_streams, ref_out, _ = stage_like_forward(PLAIN_REGIONS)
    (g_ref,) = torch.autograd.grad(ref_out.pow(2).sum(), [ref_streams])
    assert torch.equal(g_in, g_ref)


def test_one_recompute_per_block_even_with_split_backward(monkeypatch):
    # Zero-bubble schedules take input gradients first (retain_graph) and weight gradients
    # later: the block cache must survive between the two and be freed afterwards.
    from mhc_train.residual import recompute as rc

    calls = []
    original = rc._Block.recompute
    monkeypatch.setattr(rc._Block, "recompute", lambda self: (calls.append(self), original(self))[1])
    model, streams, out, plan = stage_like_forward()
    loss = out.pow(2).sum()
    torch.autograd.grad(loss, [streams], retain_graph=True)
    torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert len(calls) == len(plan.blocks) == 3  # 6 sublayers / L_r 2
    del loss, out
    import gc

    gc.collect()
    assert all(b.cache is None and b.live_handles == 0 for b in plan.blocks.values())
