"""HC and mHC connections: init equivalence, gains, ablations, learning H_res, bad config."""

import pytest
import torch

from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.residual import (
    HyperConnection,
    ManifoldHyperConnection,
    ResidualConfig,
    composite_gains,
    sinkhorn_knopp,
)


def tiny(**overrides):
    return load_model_config("tiny", norm_eps=1e-20, **overrides)


def model_pair(variant, **rkw):
    torch.manual_seed(0)
    base = MHCTransformer(tiny(), ResidualConfig(variant="baseline"))
    other = MHCTransformer(tiny(), ResidualConfig(variant=variant, **rkw))
    missing, unexpected = other.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("_conn." in k or "contract." in k for k in missing)
    return base.eval(), other.eval()


@pytest.mark.parametrize("variant,kw", [("hc", {}), ("hc", {"dynamic": False}), ("mhc", {}), ("mhc", {"n": 1})])
def test_init_equals_baseline_with_same_weights(variant, kw):
    # HC's init (one-hot pre, identity res, ones post) is its paper's Pre-Norm equivalence; our
    # mHC defaults (phi = 0, post bias 0) reproduce it too. The n equal streams are summed and
    # the final RMSNorm removes the factor n.
    base, other = model_pair(variant, **kw)
    tokens = torch.randint(0, 512, (2, 24))
    assert torch.allclose(base(tokens).logits, other(tokens).logits, atol=1e-5, rtol=1e-4)


def test_h_res_changes_the_output():
    _, model = model_pair("mhc", phi_init_std=0.02)
    tokens = torch.randint(0, 512, (2, 16))
    before = model(tokens).logits
    with torch.no_grad():
        model.blocks[1].attn_conn.bias[2 * 4 :] = torch.randn(16) * 3
    assert not torch.allclose(before, model(tokens).logits)


def test_hc_mappings_at_init():
    cfg = ResidualConfig(variant="hc", n=4)
    conn = HyperConnection(cfg, dim=8, layer_index=6)
    h_pre, h_post, h_res = conn.mappings(torch.randn(2, 4, 8))
    assert torch.equal(h_pre, torch.tensor([0.0, 0.0, 1.0, 0.0]).expand(2, 4))  # 6 % 4 = 2
    assert torch.equal(h_post, torch.ones(2, 4))
    assert torch.equal(h_res, torch.eye(4).expand(2, 4, 4))


def test_mhc_mappings_at_init():
    conn = ManifoldHyperConnection(ResidualConfig(variant="mhc", n=4), dim=8, layer_index=5)
    h_pre, h_post, h_res = conn.mappings(torch.randn(3, 4, 8))
    assert h_pre[0].argmax().item() == 1  # home stream 5 % 4
    assert torch.allclose(h_post, torch.ones(3, 4))
    assert torch.allclose(h_res.sum(-1), torch.ones(3, 4), atol=1e-6)
    diag = torch.diagonal(h_res, dim1=-2, dim2=-1)
    assert (diag > 0.9).all() and (diag < 0.99).all()  # near identity, not saturated


@pytest.mark.parametrize("switch,expected", [
    ("fix_pre", lambda n: torch.full((n,), 1.0 / n)),
    ("fix_post", lambda n: torch.ones(n)),
    ("fix_res", lambda n: torch.eye(n)),
])
@pytest.mark.parametrize("variant", ["hc", "mhc"])
def test_ablation_switches(variant, switch, expected):
    cfg = ResidualConfig(variant=variant, n=4, phi_init_std=0.1, **{switch: True})
    cls = HyperConnection if variant == "hc" else ManifoldHyperConnection
    maps = cls(cfg, dim=8, layer_index=0).mappings(torch.randn(5, 4, 8))
    index = {"fix_pre": 0, "fix_post": 1, "fix_res": 2}[switch]
    assert torch.equal(maps[index], expected(4).expand_as(maps[index]))


def test_composite_gains_known_matrices():
    h = 2.0 * torch.eye(3).expand(4, 3, 3)  # every layer doubles
    report = composite_gains(h)
    assert report.single_forward.tolist() == [2.0] * 4
    assert report.composite_forward.tolist() == [2.0, 4.0, 8.0, 16.0]  # H_l ... H_1
    assert report.composite_backward.tolist() == [16.0, 8.0, 4.0, 2.0]  # H_L ... H_l
    # A non-symmetric pair: forward product H2 H1 differs from H1 H2.
    h1 = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    h2 = torch.tensor([[1.0, 0.0], [3.0, 1.0]])
    r = composite_gains(torch.stack([h1, h2]))
    assert r.composite_forward[1].item() == (h2 @ h1).sum(-1).abs().max().item() == 7.0  # H1 H2 would give 5
    assert r.composite_backward[0].item() == (h2 @ h1).sum(-2).abs().max().item() == 5.0


def test_doubly_stochastic_composites_stay_bounded_but_hc_can_explode():
    torch.manual_seed(0)
    mhc = sinkhorn_knopp(torch.randn(60, 4, 4), t_max=20)
    r = composite_gains(mhc)
    assert r.composite_forward.max() <= 1 + 1e-5  # rows exact, so products keep rows at 1
    assert composite_gains(sinkhorn_knopp(torch.randn(60, 4, 4), t_max=200)).composite_backward.max() <= 1 + 1e-3
    hc = torch.eye(4) + 0.3 * torch.randn(60, 4, 4)  # unconstrained, HC-like
    assert composite_gains(hc).composite_forward.max() > 10


def test_model_gain_report_shapes_and_values():
    torch.manual_seed(0)
    model = MHCTransformer(tiny(), ResidualConfig(variant="mhc", phi_init_std=0.05))
    report = model.residual_gains(torch.randint(0, 512, (2, 16)))
    assert report.h_res.shape == (6, 4, 4)
    assert torch.allclose(report.single_forward, torch.ones(6), atol=1e-5)
    assert (report.composite_backward < 1.5).all()
    base = MHCTransformer(tiny(), ResidualConfig(variant="baseline"))
    assert base.residual_gains(torch.randint(0, 512, (1, 8))).composite_forward.tolist() == [1.0] * 6


def test_h_res_receives_gradient_and_moves():
    torch.manual_seed(0)
    model = MHCTransformer(tiny(), ResidualConfig(variant="mhc"))
    tokens = torch.randint(0, 512, (4, 32))
    h_before = model.residual_gains(tokens).h_res
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
        res_grad = model.blocks[1].ffn_conn.bias.grad[8:]
        assert res_grad.abs().max() > 0
        opt.step()
    assert (model.residual_gains(tokens).h_res - h_before).abs().max() > 1e-3


@pytest.mark.parametrize("kw,field", [
    ({"n": 0}, "residual.n"),
    ({"t_max": 0}, "residual.t_max"),
    ({"variant": "resnet"}, "residual.variant"),
    ({"contraction": "max"}, "residual.contraction"),
    ({"backend": "cuda"}, "residual.backend"),
    ({"variant": "baseline", "fix_res": True}, "residual.fix_"),
])
def test_bad_residual_config(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ResidualConfig(**kw)
