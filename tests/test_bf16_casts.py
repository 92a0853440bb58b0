"""bf16 weight copies once per optimizer step, not once per micro-batch (issue 14).

Under bf16 autocast each weight a matmul uses is cast to a bf16 copy, which autocast caches
until its outermost region ends. With one region per micro-batch (the code before) every
micro-batch cast every weight again, and each copy lived as long as its micro-batch's graph;
``model_steps`` (single process, DDP, FSDP without pipeline) now holds one region over the step
and runs the backward passes inside it with autocast off. A dispatch mode counts the casts of
parameters (``aten._to_copy``) over a step of three micro-batches. The pipeline is checked in
tests/dist_scripts/activation_checkpoint_check.py (pp=2, four micro-batches).
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mhc_train.bench.memory_report import allocated_during
from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.model.moe import RoutedExperts
from mhc_train.weight_casts import step_region
from mhc_train.residual import ResidualConfig
from mhc_train.train.activation_checkpoint import apply_activation_checkpointing
from mhc_train.train.layouts import model_steps

MICRO_BATCHES = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


class WeightCasts(TorchDispatchMode):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.names = {p.data_ptr(): n for n, p in model.named_parameters()}
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.names:
            self.counts[self.names[args[0].data_ptr()]] += 1
        return func(*args, **(kwargs or {}))


def bf16():
    return step_region("cpu", torch.bfloat16)  # what the trainer's autocast() returns


def per_micro_batch_regions(model, batches):
    """The step as it was: one autocast region per micro-batch, backward outside it."""
    for inputs, targets in batches:
        with bf16():
            out = model(inputs, targets)
        (out.loss / len(batches)).backward()


def one_region(model, batches):
    model_steps(model, batches, bf16, lambda i, last: contextlib.nullcontext(), torch.device("cpu"))


def setup(variant="mhc", mode="none", recompute="off"):
    torch.manual_seed(0)
    model = MHCTransformer(load_model_config("tiny"), ResidualConfig(variant=variant, recompute=recompute))
    apply_activation_checkpointing(list(model.blocks), mode)
    gen = torch.Generator().manual_seed(1)
    batches = [(t[:, :-1], t[:, 1:]) for t in (torch.randint(0, 512, (2, 17), generator=gen)
                                               for _ in range(MICRO_BATCHES))]
    return model, batches


def casts_per_step(step, **kw) -> collections.Counter:
    model, batches = setup(**kw)
    counter = WeightCasts(model)
    with counter:
        step(model, batches)
    return counter.counts


def autocast_cast(counts):
    """The weights autocast casts (the routed experts' stacked weights are cast by RoutedExperts,
    tested on their own below)."""
    return {n: c for n, c in counts.items() if ".experts." not in n}


def test_the_code_before_cast_every_weight_per_micro_batch():
    before = autocast_cast(casts_per_step(per_micro_batch_regions))
    assert before and set(before.values()) == {MICRO_BATCHES}


@pytest.mark.parametrize("mode,recompute", [("none", "off"), ("none", "auto"), ("full", "auto"), ("selective", "auto")])
def test_each_weight_is_cast_once_per_step(mode, recompute):
    """Also when the blocks are recomputed in backward (activation checkpointing, the mHC
    residual-stream recompute): the recomputation finds the copies in the cache."""
    after = autocast_cast(casts_per_step(one_region, mode=mode, recompute=recompute))
    assert after and set(after.values()) == {1}, after


@pytest.mark.parametrize("mode,recompute", [("none", "off"), ("full", "auto")])
def test_expert_weights_are_cast_once_per_step(mode, recompute):
    """The routed experts' stacked weights, which RoutedExperts casts itself (mhc_train.weight_casts)."""
    counts = casts_per_step(one_region, mode=mode, recompute=recompute)
    experts = {n: c for n, c in counts.items() if ".experts." in n}
    assert experts and set(experts.values()) == {1}, experts


def test_expert_weight_copies_end_with_the_region_and_follow_in_place_changes():
    """Each region casts anew (the optimizer changes the weights between steps), and an in-place
    change inside a region is not answered with the stale copy."""
    from mhc_train import weight_casts

    w = torch.nn.Parameter(torch.randn(2, 4, 8))
    with step_region("cpu"):
        first = weight_casts.cast_weight(w, torch.bfloat16)
        assert weight_casts.cast_weight(w, torch.bfloat16) is first
        with torch.no_grad():
            w.mul_(2)
        again = weight_casts.cast_weight(w, torch.bfloat16)
        assert again is not first and torch.equal(again, w.detach().to(torch.bfloat16))
    assert not weight_casts._copies
    with step_region("cpu"):
        assert weight_casts.cast_weight(w, torch.bfloat16) is not again
    with torch.no_grad(), step_region("cpu"):  # a copy without a graph is never cached
        weight_casts.cast_weight(w, torch.bfloat16)
        assert not weight_casts._copies


def test_gradients_are_those_of_one_region_per_micro_batch():
    """The cached copies are the same values, and the backward still runs without autocast."""
    grads = []
    for step in (per_micro_batch_regions, one_region):
        model, batches = setup()
        step(model, batches)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_the_step_peak_grows_by_at_most_the_copies_it_keeps():
    """The copies now live for the whole step instead of one micro-batch's graph. A micro-batch's
    graph holds them anyway while it runs, but the first backward frees each layer's copies as it
    goes while it allocates the fp32 gradients: at its end the step's peak may exceed the old one,
    by no more than the bf16 copies kept (measured: 2.5 % of the tiny model's step with bf16
    streams, none with fp32 ones, whose activations set the peak)."""
    model, batches = setup()
    allocated_during(lambda: per_micro_batch_regions(model, batches))  # warm-up: state made once per process
    # bf16 bytes of the weights a step casts: the linear layers' and the experts' stacked ones
    copies = sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    copies += sum(2 * w.numel() for m in model.modules() if isinstance(m, RoutedExperts) for w in (m.w1, m.w3, m.w2))
    peaks = []
    for step in (per_micro_batch_regions, one_region):
        model.zero_grad(set_to_none=True)
        peaks.append(allocated_during(lambda: step(model, batches))[1])
    assert peaks[1] <= peaks[0] + copies, (peaks, copies)
