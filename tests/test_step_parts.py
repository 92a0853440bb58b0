"""The pieces the training step delegates: the router-bias update as an optimizer step hook
(mhc_train/train/router_balance.py) and fault injection outside the layouts
(mhc_train/train/fault_injection.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.residual import ResidualConfig
from mhc_train.train.fault_injection import nonfinite_step
from mhc_train.train.layouts import model_steps
from mhc_train.train.router_balance import RouterBalance


class OneProcess:
    def reduce_router_loads(self, routers):
        return [r.expert_load for r in routers]


def setup():
    torch.manual_seed(0)
    model = MHCTransformer(load_model_config("tiny"), ResidualConfig(variant="mhc"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    return model, optimizer, [(tokens[:, :-1], tokens[:, 1:])]


def step(model, batches):
    return model_steps(model, batches, contextlib.nullcontext, lambda i, last: contextlib.nullcontext(),
                       torch.device("cpu"))


def test_the_optimizer_step_moves_the_biases_as_the_update_rule_says():
    model, optimizer, batches = setup()
    balance = RouterBalance(model, OneProcess(), optimizer)
    step(model, batches)
    metric = balance.loads()
    loads = [r.expert_load.clone() for r in balance.routers]
    before = [r.expert_bias.clone() for r in balance.routers]
    assert all(float(load.sum()) > 0 for load in loads)
    imbalance = [float(load.max() / load.mean()) for load in loads]
    assert metric == pytest.approx({"load_imbalance": sum(imbalance) / len(imbalance),
                                    "load_imbalance_max": max(imbalance)})
    optimizer.step()
    balance.check_updated()
    speed = model.cfg.bias_update_speed
    for r, load, b in zip(balance.routers, loads, before):  # DeepSeek-V3: b += speed * sign(mean - load)
        torch.testing.assert_close(r.expert_bias, b + speed * torch.sign(load.mean() - load), rtol=0, atol=0)
        assert not r.expert_load.any()


def test_a_skipped_step_leaves_the_biases_and_a_missing_hook_is_an_error():
    model, optimizer, batches = setup()
    balance = RouterBalance(model, OneProcess(), optimizer)
    before = [r.expert_bias.clone() for r in balance.routers]
    step(model, batches)
    balance.loads()
    balance.discard()  # the layout reported the update skipped
    assert all(not r.expert_load.any() for r in balance.routers)
    assert all(torch.equal(r.expert_bias, b) for r, b in zip(balance.routers, before))
    with pytest.raises(RuntimeError, match="router-bias hook 0 times"):
        balance.check_updated()  # "applied", yet the registered optimizer never stepped
    optimizer.step()  # a step loads() did not prepare (DCP's state init when loading): no update
    assert all(torch.equal(r.expert_bias, b) for r, b in zip(balance.routers, before))


def test_an_injected_step_makes_the_loss_and_every_gradient_non_finite_and_only_that_step():
    model, _, batches = setup()
    with nonfinite_step(True):
        parts = step(model, batches)
    assert not torch.isfinite(parts[:2]).any()  # loss and CE (the balance loss is off: 0)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(not torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if torch.isfinite(g).all()]
    model.zero_grad(set_to_none=True)
    with nonfinite_step(False):
        assert torch.isfinite(step(model, batches)).all()
    assert torch.isfinite(step(model, batches)).all()  # the hook is gone after the step
