"""Trainer parts without a training run: LR schedule, weight-decay groups, config schema checks."""

from __future__ import annotations

import re

import pytest
import torch

from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.residual import ResidualConfig
from mhc_train.train.app import hydra_error_message
from mhc_train.train.config import ConfigError, validate
from mhc_train.train.optim import build_optimizer, split_decay
from mhc_train.train.schedule import build_scheduler, lr_multiplier


# ------------------------------------------------------------------------------- schedule


def test_lr_schedule_warmup_then_step_decay():
    kw = dict(total_steps=1000, warmup_steps=100, decay_at=(0.8, 0.9), decay_factors=(0.316, 0.1))
    # linear warmup: the first update already has lr/W, the W-th the full rate
    assert lr_multiplier(0, **kw) == pytest.approx(0.01)
    assert lr_multiplier(49, **kw) == pytest.approx(0.5)
    assert lr_multiplier(99, **kw) == pytest.approx(1.0)
    assert lr_multiplier(100, **kw) == 1.0
    assert lr_multiplier(799, **kw) == 1.0
    # from 80% of the steps: 0.316 x base; from 90%: 0.1 x base (multipliers of the base rate)
    assert lr_multiplier(800, **kw) == 0.316
    assert lr_multiplier(899, **kw) == 0.316
    assert lr_multiplier(900, **kw) == 0.1
    assert lr_multiplier(999, **kw) == 0.1
    assert lr_multiplier(900, schedule="constant", total_steps=1000, warmup_steps=0) == 1.0


def test_scheduler_drives_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=4, schedule="step", decay_at=[0.8, 0.9],
                            decay_factors=[0.316, 0.1])
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])  # the rate of this update
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4:16] == pytest.approx([1e-3] * 12)
    assert lrs[16:18] == pytest.approx([3.16e-4] * 2)
    assert lrs[18:] == pytest.approx([1e-4] * 2)


# ---------------------------------------------------------------------------- weight decay


def _pattern(name: str) -> str:
    return re.sub(r"blocks\.\d+\.", "blocks.*.", name)


@pytest.mark.parametrize("variant", ["baseline", "hc", "mhc"])
def test_no_weight_decay_groups(variant):
    model = MHCTransformer(load_model_config("tiny"), ResidualConfig(variant=variant, contraction="learned"))
    decay, no_decay = split_decay(model)
    no_decay_names = {_pattern(n) for n in no_decay}
    decay_names = {_pattern(n) for n in decay}
    # norms, biases, gates/scales, static maps: no decay
    expected = {"norm.weight", "blocks.*.attn_norm.weight", "blocks.*.ffn_norm.weight",
                "blocks.*.attn.kv_norm.weight", "contract.static_weight"}
    if variant == "mhc":
        expected |= {f"blocks.*.{c}.{p}" for c in ("attn_conn", "ffn_conn") for p in ("alpha", "bias")}
    if variant == "hc":
        expected |= {f"blocks.*.{c}.{p}" for c in ("attn_conn", "ffn_conn")
                     for p in ("static_alpha", "static_beta", "dynamic_alpha_scale", "dynamic_beta_scale", "norm.weight")}
    assert no_decay_names == expected
    # weight matrices (incl. mHC phi, HC dynamic weights, experts, router, embedding, head): decayed
    assert {"embed.weight", "head.weight", "blocks.*.attn.wq.weight", "blocks.*.ffn.experts.w1",
            "blocks.*.ffn.router.weight"} <= decay_names
    if variant == "mhc":
        assert "blocks.*.attn_conn.phi" in decay_names
    if variant == "hc":
        assert {"blocks.*.attn_conn.dynamic_alpha_fn", "blocks.*.attn_conn.dynamic_beta_fn"} <= decay_names
    assert set(decay) | set(no_decay) == {n for n, _ in model.named_parameters()}
    assert not any("expert_bias" in n for n in decay)  # a buffer, never optimised

    opt = build_optimizer(model, lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert len(opt.param_groups[1]["params"]) == len(no_decay)
    _, no_decay_emb = split_decay(model, decay_embeddings=False)
    assert no_decay_emb["embed.weight"] == "embedding"


# ---------------------------------------------------------------------------------- config


def test_default_config_is_small_mhc_on_bundled_data(composer):
    cfg = validate(composer())
    assert (cfg.model.name, cfg.residual.variant, cfg.residual.n, cfg.data.source) == ("small", "mhc", 4, "bundled")
    assert cfg.data.vocab_size == cfg.model.vocab_size == 4096
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.weight_decay == 0.1
    assert cfg.lr == 3e-3
    assert validate(composer("model=3b", "train.seq_len=4096")).lr == 8.6e-4
    assert validate(composer("optim=adamw_paper")).optim.eps == 1e-20
    quick = validate(composer("experiment=quickstart"))
    assert quick.experiment.name == "quickstart" and quick.train.steps < 200


@pytest.mark.parametrize("overrides, message", [
    (["residual.n=0"], "residual.n: expansion rate must be an integer >= 1, got 0"),
    (["optim.warmup_steps=190"], "optim.warmup_steps: warmup (190 steps) must end before the first decay"),
    (["train.seq_len=1024"], "train.seq_len: 1024 exceeds model.max_seq_len=512"),
    (["+train.foo=1"], "train.foo: unknown key"),
    (["model.name=custom"], "optim.lr: no default learning rate for model 'custom'"),
    (["optim.decay_factors=[0.3]"], "optim.decay_factors: 1 factors for 2 decay points"),
    (["train.stop_at=400"], "train.stop_at: must be between 1 and train.steps=200"),
])
def test_validate_names_the_key(composer, overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(composer(*overrides))
    assert str(e.value).startswith(message)


def test_composition_errors_become_one_line(composer):
    for overrides, message in [(["model.dimm=3"], "model.dimm: unknown key"),
                               (["train.steps=abc"], "train.steps: Value 'abc' of type 'str' could not be converted"),
                               (["residual=nope"], "residual: unknown option 'nope' (available: baseline, hc, mhc)")]:
        with pytest.raises(Exception) as e:
            composer(*overrides)
        line = hydra_error_message(e.value)
        assert line.startswith(message) and "\n" not in line


def test_checkpoint_loads_when_some_parameters_have_no_optimizer_state(tmp_path, caplog):
    # HC under residual.fix_post: the dynamic post weights never get a gradient, so AdamW never
    # creates their state and the checkpoint has none; loading must still work, and the model
    # itself must still be loaded strictly.
    from mhc_train.train.checkpoint import CheckpointManager, ModelState, load_checkpoint

    torch.manual_seed(0)
    cfg = load_model_config("tiny")
    model = MHCTransformer(cfg, ResidualConfig(variant="hc", fix_post=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 512, (2, 9))
    model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    opt.step()
    assert any(p not in opt.state for p in model.parameters())
    path = CheckpointManager(tmp_path / "checkpoints", keep=2).save(1, ModelState(model, opt), {"step": 1}, {})
    fresh = MHCTransformer(cfg, ResidualConfig(variant="hc", fix_post=True))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    with caplog.at_level("WARNING", logger="mhc_train.train"):
        assert load_checkpoint(path, ModelState(fresh, fresh_opt))["step"] == 1
    stateless = sum(p not in opt.state for p in model.parameters())
    assert f"no optimizer state for {stateless} parameter(s)" in caplog.text  # said, not silent
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_adamw_is_fused_on_cuda_and_foreach_elsewhere():
    from mhc_train.train.optim import implementation

    class OnCuda:  # stands for a CUDA parameter (no GPU here): only its device is read
        device = torch.device("cuda", 0)

    assert implementation([OnCuda(), OnCuda()]) == {"fused": True}
    assert implementation([OnCuda(), torch.zeros(1)]) == {"foreach": None}
    model = MHCTransformer(load_model_config("tiny"), ResidualConfig(variant="mhc"))
    opt = build_optimizer(model, lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1)
    assert not opt.defaults["fused"]


def test_deterministic_default_is_on_for_cpu_and_off_for_cuda():
    from types import SimpleNamespace

    from mhc_train.train.trainer import deterministic

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert deterministic(SimpleNamespace(deterministic=None), cpu)
    assert not deterministic(SimpleNamespace(deterministic=None), cuda)
    assert deterministic(SimpleNamespace(deterministic=True), cuda)  # the switch
    assert not deterministic(SimpleNamespace(deterministic=False), cpu)


def test_resume_uses_this_runs_adamw_implementation(subprocess_env, tmp_path, monkeypatch):
    """The saved param_groups carry the saving run's fused / foreach flags (a CPU checkpoint says
    foreach); the resumed optimizer takes this run's (here: stand-in flags, as no GPU is at hand)."""
    from test_train import run

    from mhc_train.train import trainer as trainer_mod

    monkeypatch.setenv("MHC_TRAIN_CACHE", subprocess_env["MHC_TRAIN_CACHE"])
    out = tmp_path / "runs"
    assert run(out, "train.steps=4", "train.checkpoint_every=2", "train.stop_at=2") == 0
    monkeypatch.setattr(trainer_mod, "implementation", lambda params: {"foreach": False})
    groups = []
    real_loop = trainer_mod.Trainer._loop

    def loop(self, ckpts):
        groups.extend(dict(g) for g in self.optimizer.param_groups)
        return real_loop(self, ckpts)

    monkeypatch.setattr(trainer_mod.Trainer, "_loop", loop)
    assert run(out, "train.steps=4", "train.checkpoint_every=2") == 0
    assert groups and all(g["foreach"] is False and not g["fused"] for g in groups)
