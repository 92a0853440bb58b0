"""DeepSeekMoE: vectorised dispatch against a per-token loop, routing rule, balancing."""

import pytest
import torch
import torch.nn.functional as F

from mhc_train.model import load_model_config
from mhc_train.model.config import ModelConfig
from mhc_train.model.moe import MoE


def make_moe(**kw):
    torch.manual_seed(0)
    cfg = load_model_config("tiny", **kw)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    return moe


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the routing rule written out."""
    cfg = moe.cfg
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        scores = torch.sigmoid(moe.router.weight @ x[t])
        chosen = torch.topk(scores + moe.router.expert_bias, cfg.n_activated_experts).indices
        gates = scores[chosen]
        gates = gates / gates.sum() * cfg.route_scale
        for g, e in zip(gates, chosen):
            h = F.silu(moe.experts.w1[e] @ x[t]) * (moe.experts.w3[e] @ x[t])
            out[t] += g * (moe.experts.w2[e] @ h)
        if moe.shared is not None:
            out[t] += moe.shared(x[t])
    return out


@pytest.mark.parametrize("kw", [{}, {"route_scale": 2.5, "n_shared_experts": 0}, {"n_activated_experts": 8}])
def test_dispatch_matches_per_token_reference(kw):
    moe = make_moe(**kw).eval()
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.randn(8) * 0.5)  # bias changes the choice only
    x = torch.randn(2, 9, 64)
    got = moe(x)
    want = naive_moe(moe, x.view(-1, 64)).view_as(x)
    assert torch.allclose(got, want, atol=1e-5)


def test_gradients_flow_to_router_and_experts():
    moe = make_moe().train()
    moe(torch.randn(3, 5, 64)).pow(2).sum().backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bias_update_reduces_synthetic_imbalance():
    moe = make_moe().train()
    x = torch.randn(256, 64) + 1.0
    with torch.no_grad():
        moe.router.weight[0] = 3.0 * x.mean(0) / x.mean(0).norm()  # expert 0 attracts most tokens
    def imbalance():
        moe.router.expert_load.zero_()
        moe(x)
        load = moe.router.expert_load.clone()
        return (load.max() / load.mean()).item()

    start = imbalance()
    for _ in range(300):
        moe.router.expert_load.zero_()
        moe(x)
        moe.router.update_bias(speed=0.01)
    end = imbalance()
    assert start > 3.0 and end < 1.3, (start, end)  # max load / mean load
    assert moe.router.expert_bias[0] < 0  # the over-loaded expert is pushed down


def test_load_is_counted_only_in_training():
    moe = make_moe()
    moe.eval()(torch.randn(1, 4, 64))
    assert moe.router.expert_load.sum() == 0
    moe.train()(torch.randn(1, 4, 64))
    assert moe.router.expert_load.sum() == 4 * 2  # tokens x top-k


def test_sequence_balance_loss():
    moe = make_moe(seq_aux_loss_coef=0.1).train()
    moe(torch.randn(2, 6, 64))
    assert moe.aux_loss is not None and moe.aux_loss > 0
    # Perfectly uniform scores and loads give f_i = 1, P_i = 1/E: loss = coef * 1.
    e, k, s = 8, 2, 4
    scores = torch.full((s, e), 0.5)
    indices = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    loss = moe._sequence_balance_loss(scores, indices, (1, s, 64))
    assert torch.allclose(loss, torch.tensor(0.1))
    assert make_moe().train()(torch.randn(1, 3, 64)) is not None and make_moe().aux_loss is None


@pytest.mark.parametrize("kw,field", [
    ({"n_activated_experts": 9}, "model.n_activated_experts"),
    ({"qk_rope_head_dim": 32}, "model.qk_rope_head_dim"),
    ({"qk_rope_head_dim": 7}, "model.qk_rope_head_dim"),
    ({"n_dense_layers": 4}, "model.n_dense_layers"),
    ({"dim": 0}, "model.dim"),
])
def test_bad_model_config(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_model_config("tiny", **kw)


def test_unknown_field_and_size():
    with pytest.raises(ValueError, match="model.n_layer: unknown field"):
        load_model_config("tiny", n_layer=3)
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        load_model_config("huge")
    assert ModelConfig().ffn_dim_dense == 8 * 896
