"""Activation checkpointing (``train.activation_checkpoint=none|selective|full``,
mhc_train/train/activation_checkpoint.py).

Every option trains bitwise like ``none``, alone and with ``residual.recompute``, for the three
variants: the checkpoint re-runs the same ops on the same values in the same order (selective
keeps some outputs as they were), and CPU fp32 (and bf16) kernels are deterministic, so the
recomputed tensors, hence the gradients, updates and losses, are identical bits. The routers
count each token once although the recomputation re-runs them; parameter names are unchanged;
the memory kept for backward falls none > selective > full (the figures of every combination:
``mhc-train-memory --activation-checkpoint``). Pipeline and FSDP:
tests/dist_scripts/activation_checkpoint_check.py, one torchrun launch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mhc_train.bench.memory_report import step_memory
from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.model.transformer import Block
from mhc_train.residual import ResidualConfig
from mhc_train.train.activation_checkpoint import apply_activation_checkpointing

STEPS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def build(variant: str, mode: str, recompute: str = "off") -> MHCTransformer:
    """The tiny model with the sequence-wise balance loss on (its graph crosses the checkpoints too)."""
    torch.manual_seed(0)
    cfg = load_model_config("tiny", seq_aux_loss_coef=0.01)
    model = MHCTransformer(cfg, ResidualConfig(variant=variant, recompute=recompute))
    apply_activation_checkpointing(list(model.blocks), mode)
    return model


@functools.lru_cache(maxsize=None)
def train(variant: str, mode: str, recompute: str = "off", bf16: bool = False) -> dict:
    """STEPS AdamW steps of the tiny model; losses, router loads and biases per step, final weights."""
    model = build(variant, mode, recompute)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    routers = [m.router for m in model.moe_layers()]
    out = {"losses": [], "loads": [], "biases": []}
    for _ in range(STEPS):
        tokens = torch.randint(0, 512, (2, 17), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        loss.backward()
        out["losses"].append(loss.detach())
        out["loads"].append(torch.stack([r.expert_load.clone() for r in routers]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_router_biases()
        out["biases"].append(torch.stack([r.expert_bias.clone() for r in routers]))
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def assert_same_training(got: dict, ref: dict) -> None:
    for key in ("losses", "loads", "biases"):
        for step, (a, b) in enumerate(zip(got[key], ref[key])):
            assert torch.equal(a, b), (key, step, a, b)
    assert got["params"].keys() == ref["params"].keys()
    for name in ref["params"]:
        assert torch.equal(got["params"][name], ref["params"][name]), name


@pytest.mark.parametrize("variant", ["baseline", "hc", "mhc"])
@pytest.mark.parametrize("mode", ["selective", "full"])
@pytest.mark.parametrize("recompute", ["off", "auto"])
def test_each_option_trains_bitwise_like_none(variant, mode, recompute):
    assert_same_training(train(variant, mode, recompute), train(variant, "none", "off"))


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_under_bf16_autocast_too(mode):
    """The recomputation re-enters the forward's autocast (bf16 matmuls), with and without the
    residual-stream recompute (which re-enters it on its own)."""
    assert_same_training(train("mhc", mode, "auto", bf16=True), train("mhc", "none", "off", bf16=True))


def test_the_blocks_really_run_again_in_backward_but_routers_count_once():
    calls = {"router": 0, "attention": 0}
    model = build("mhc", "full")
    for block in model.blocks:
        block.attn.register_forward_hook(lambda *a: calls.__setitem__("attention", calls["attention"] + 1))
        if block.is_moe:
            block.ffn.router.register_forward_hook(lambda *a: calls.__setitem__("router", calls["router"] + 1))
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    loss = model(tokens[:, :-1], tokens[:, 1:]).loss
    forward_calls = dict(calls)
    balance_losses = [m.aux_loss for m in model.moe_layers()]
    loss.backward()
    n_moe = len(model.moe_layers())
    assert forward_calls == {"router": n_moe, "attention": 3}
    assert calls == {"router": 2 * n_moe, "attention": 6}  # each block once more in backward
    reference = build("mhc", "none")
    reference(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    for got, ref, aux in zip(model.moe_layers(), reference.moe_layers(), balance_losses):
        assert got.router.expert_load.sum() == 2 * 16 * 2  # tokens x top-k, once
        assert torch.equal(got.router.expert_load, ref.router.expert_load)
        assert aux is not None and got.aux_loss is aux  # the forward's balance loss, not the recompute's


def test_memory_kept_for_backward_falls_with_each_option():
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(1))
    step_memory(build("mhc", "none"), tokens)  # warm-up: state made once per process
    kept = {(mode, recompute): step_memory(build("mhc", mode, recompute), tokens)[0]
            for mode, recompute in [("none", "off"), ("none", "auto"), ("selective", "auto"), ("full", "auto")]}
    assert kept["full", "auto"] < kept["selective", "auto"] < kept["none", "auto"] < kept["none", "off"]


def test_parameter_names_and_module_tree_are_unchanged():
    plain, checkpointed = build("mhc", "none"), build("mhc", "full")
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in checkpointed.named_modules()] == [n for n, _ in plain.named_modules()]
    assert all(type(b) is Block for b in checkpointed.blocks)
    checkpointed.load_state_dict(plain.state_dict())  # strict: a plain checkpoint loads, and back


def test_a_deep_copy_checkpoints_its_own_blocks():
    model = build("mhc", "full")
    clone = copy.deepcopy(model)
    tokens = torch.randint(0, 512, (2, 9))
    clone(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in clone.blocks.parameters())
    assert clone.blocks[0].forward.__self__ is clone.blocks[0]


def test_applied_twice_or_unknown_mode_is_refused():
    model = build("mhc", "selective")
    with pytest.raises(ValueError, match="applied twice"):
        apply_activation_checkpointing(list(model.blocks), "full")
    with pytest.raises(ValueError, match="train.activation_checkpoint: must be one of none, selective, full"):
        apply_activation_checkpointing(list(model.blocks), "some")


def test_the_layouts_checkpoint_the_blocks_on_the_meta_model(composer):
    """Layout.prepare wraps the blocks before materialising them; one step with two micro-batches
    equals none's bitwise."""
    from mhc_train.train.config import validate
    from mhc_train.train.layouts import make_layout

    def step(mode):
        cfg = validate(composer("model=tiny", "train.seq_len=16", "residual=mhc", "residual.recompute=auto",
                                f"train.activation_checkpoint={mode}"))
        with torch.device("meta"):
            model = MHCTransformer(cfg.model, cfg.residual)
        layout = make_layout(model, torch.device("cpu"), cfg, bf16=False)
        layout.prepare()
        gen = torch.Generator().manual_seed(2)
        batches = [(t[:, :-1], t[:, 1:]) for t in (torch.randint(0, 512, (2, 17), generator=gen) for _ in range(2))]
        parts = layout.forward_backward(batches, contextlib.nullcontext)
        wrapped = [getattr(b.forward, "activation_checkpoint", False) for b in model.blocks]
        return parts, {n: p.grad for n, p in model.named_parameters()}, wrapped

    ref, ref_grads, ref_wrapped = step("none")
    assert not any(ref_wrapped)
    for mode in ("selective", "full"):
        parts, grads, wrapped = step(mode)
        assert all(wrapped), mode
        assert torch.equal(parts, ref), mode
        assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads), mode


def test_pipeline_and_fsdp_train_bitwise_like_none(subprocess_env):
    """One launch of 2 ranks: pp=2 (1F1B, DualPipeV with its overlap handler) and FSDP (with ep=2,
    and in bf16) with each option and residual.recompute (the script's docstring)."""
    script = Path(__file__).resolve().parent / "dist_scripts" / "activation_checkpoint_check.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=subprocess_env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert out.count("ok  ") == 3 + 3 + 3 + 3 + 2 + 1, out[-4000:]
