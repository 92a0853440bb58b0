"""The eager-floor benchmark: its equivalent forms must really be equivalent, and its report must
add up (the timings themselves are not tested)."""

import re

import pytest
import torch

from mhc_train.bench import eager_floor


def test_every_form_of_a_group_computes_the_same():
    forms = eager_floor.connection_forms(tokens=24, n=4, c=8, t_max=5)
    assert all(len(variants) >= 2 for variants in forms.values())
    eager_floor.check_forms_agree(forms)


def test_a_form_that_computes_something_else_is_refused():
    forms = eager_floor.connection_forms(tokens=24, n=4, c=8, t_max=5)
    name, fn = forms["projection grad x"][1]
    forms["projection grad x"][1] = (name, lambda: fn() * 1.01)
    with pytest.raises(AssertionError, match="projection grad x"):
        eager_floor.check_forms_agree(forms)


def test_log_domain_sinkhorn_matches_the_reference_and_its_gradient():
    logits = torch.randn(6, 4, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(6, 4, 4, dtype=torch.float64)
    ref = eager_floor.sinkhorn_forward(logits.detach(), 7)
    nnt = logits.detach().permute(1, 2, 0).contiguous()
    got = torch.exp(eager_floor._log_sinkhorn(nnt, 7)).permute(2, 0, 1)
    torch.testing.assert_close(got, ref)
    from mhc_train.residual.sinkhorn import _iterate_autograd

    (expected,) = torch.autograd.grad(_iterate_autograd(logits, 7), logits, grad)
    got_grad = eager_floor._log_sinkhorn_backward(nnt, grad.permute(1, 2, 0).contiguous(), 7).permute(2, 0, 1)
    torch.testing.assert_close(got_grad, expected)


def test_report_floor_is_the_sum_of_the_fastest_forms(capsys):
    eager_floor.main(["--model", "tiny", "--batch", "1", "--seq", "8", "--rounds", "1",
                      "--op-repeats", "1", "--evict-mb", "1", "--threads", "1"])
    out = capsys.readouterr().out
    budget = re.search(r"budget: .* = ([\d.]+) ms per sublayer", out)
    rows = re.findall(r"^(?:projection|RMS|mixes|sinkhorn|grads).*?\s([\d.]+)   ", out, flags=re.M)
    floor = re.search(r"floor \(sum of the fastest forms\)\s+([\d.]+)", out)
    assert budget and floor and len(rows) == 9, out
    # Nine figures and the floor, each rounded to 0.01 ms.
    assert abs(sum(map(float, rows)) - float(floor.group(1))) <= 0.005 * (len(rows) + 1) + 1e-9
    assert re.search(r"the eager floor is (above|within) the budget", out)
