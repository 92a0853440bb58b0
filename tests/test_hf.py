"""Conversion to and from transformers' DeepseekV3ForCausalLM: same logits, lossless round trips."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM  # noqa: E402

from mhc_train.model import MHCTransformer, load_model_config  # noqa: E402
from mhc_train.model.hf import (  # noqa: E402
    TRAINING_FIELDS,
    from_hf,
    hf_config,
    model_config_from_hf,
    set_norm_eps,
    to_hf,
)
from mhc_train.residual import ResidualConfig  # noqa: E402

TOL = 1e-5  # max abs logit difference (float32)

# Our model configs exercised against HF: plain tiny; query compression, route scale, two shared
# experts; the paper's eps 1e-20 (HF hard-codes 1e-6 in the MLA norms), no dense layer, no shared
# expert, unnormalised gates; an explicit dense FFN width with two dense layers.
CASES = {
    "tiny": {},
    "q_lora": dict(q_lora_rank=16, n_dense_layers=1, route_scale=2.5, n_shared_experts=2),
    "paper_eps": dict(norm_eps=1e-20, n_dense_layers=0, n_shared_experts=0, norm_topk_prob=False, route_scale=1.7),
    "dense_width": dict(n_dense_layers=2, dense_ffn_dim=80, n_activated_experts=3, q_lora_rank=24),
}


def baseline(name: str, seed: int = 0) -> MHCTransformer:
    torch.manual_seed(seed)
    model = MHCTransformer(load_model_config("tiny", **CASES[name]), ResidualConfig(variant="baseline"))
    randomise(model)
    return model.eval()


@torch.no_grad()
def randomise(model) -> None:
    """Non-trivial routing bias and norm weights, so that a swapped or missing tensor shows."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(("expert_bias", "e_score_correction_bias")):
            tensor.normal_(0.0, 0.05)
        elif "norm" in name and name.endswith("weight"):
            tensor.add_(0.1 * torch.randn_like(tensor))


def tokens(cfg, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (2, 48), generator=g)


@torch.no_grad()
def max_diff(ours: MHCTransformer, hf, tok: torch.Tensor) -> float:
    return (ours(tok).logits - hf(tok).logits).abs().max().item()


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k].cpu(), b[k].cpu())]
    assert not different, different


def fresh_hf(seed: int = 0, cfg_overrides: dict | None = None, **hf_overrides) -> DeepseekV3ForCausalLM:
    """An HF model with transformers' own init (plus random router bias and norm weights)."""
    torch.manual_seed(seed)
    config = hf_config(load_model_config("tiny", **(cfg_overrides or {})), **hf_overrides)
    hf = DeepseekV3ForCausalLM._from_config(config, attn_implementation="sdpa", experts_implementation="eager")
    randomise(hf)
    return hf.float().eval()


# ------------------------------------------------------------------------------------ configs


def test_hf_config_fields():
    cfg = load_model_config("tiny", q_lora_rank=16, route_scale=2.5)
    c = hf_config(cfg)
    assert (c.hidden_size, c.num_hidden_layers, c.first_k_dense_replace) == (64, 3, 1)
    assert c.num_attention_heads == c.num_key_value_heads == 4
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank, c.q_lora_rank) == (16, 8, 16, 32, 16)
    assert c.intermediate_size == cfg.ffn_dim_dense == 96 and c.moe_intermediate_size == 32
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts) == (8, 2, 1)
    assert (c.n_group, c.topk_group, c.routed_scaling_factor, c.norm_topk_prob) == (1, 1, 2.5, True)
    assert c.rope_parameters["rope_type"] == "default" and c.rope_parameters["rope_theta"] == cfg.rope_theta
    assert c.rope_interleave and not c.tie_word_embeddings and not c.attention_bias
    assert (c.rms_norm_eps, c.max_position_embeddings, c.initializer_range) == (1e-6, 128, 0.02)
    assert hf_config(load_model_config("tiny")).q_lora_rank is None  # 0 = no query compression


@pytest.mark.parametrize("case", CASES)
def test_model_config_round_trip(case):
    cfg = load_model_config("tiny", **CASES[case])
    assert model_config_from_hf(hf_config(cfg), name=cfg.name) == cfg


# ------------------------------------------------------------------------------------ to_hf


@pytest.mark.parametrize("case", CASES)
def test_to_hf_logits_match(case):
    model = baseline(case)
    cfg = model.cfg
    hf = to_hf(model)
    assert not hf.training and all(p.dtype == torch.float32 for p in hf.parameters())
    tok = tokens(cfg)
    # The router bias decides routing: zeroing it changes the logits, so routing is non-trivial.
    hf_zero_bias = to_hf(model)
    for m in hf_zero_bias.modules():
        if hasattr(m, "e_score_correction_bias"):
            m.e_score_correction_bias.zero_()
    if cfg.n_layers > cfg.n_dense_layers:
        assert max_diff(model, hf_zero_bias, tok) > 1e-3
    diff = max_diff(model, hf, tok)
    print(f"to_hf[{case}]: max |logit diff| = {diff:.3e}")
    assert diff <= TOL


def test_to_hf_sets_the_mla_norm_eps():
    # HF builds q_a_layernorm / kv_a_layernorm with eps 1e-6 whatever rms_norm_eps says; to_hf
    # puts our norm_eps (here the paper's 1e-20) on every norm module.
    cfg = load_model_config("tiny", **CASES["paper_eps"], q_lora_rank=16)
    torch.manual_seed(0)
    model = MHCTransformer(cfg, ResidualConfig(variant="baseline"))
    randomise(model)
    model.eval()
    hf = to_hf(model)
    eps = {m.variance_epsilon for m in hf.modules() if hasattr(m, "variance_epsilon")}
    assert eps == {1e-20}
    tok = tokens(cfg)
    matched = max_diff(model, hf, tok)
    for layer in hf.model.layers:
        layer.self_attn.kv_a_layernorm.variance_epsilon = 1e-6
        layer.self_attn.q_a_layernorm.variance_epsilon = 1e-6
    unmatched = max_diff(model, hf, tok)
    print(f"eps 1e-20: matched {matched:.3e}, with HF's hard-coded 1e-6 {unmatched:.3e}")
    assert matched <= TOL and unmatched > 10 * matched + 1e-7


@pytest.mark.parametrize("variant", ["hc", "mhc"])
def test_to_hf_rejects_multi_stream(variant):
    torch.manual_seed(0)
    model = MHCTransformer(load_model_config("tiny"), ResidualConfig(variant=variant))
    with pytest.raises(ValueError, match=f"variant='{variant}'"):
        to_hf(model)


def test_to_hf_learned_contraction():
    torch.manual_seed(0)
    model = MHCTransformer(load_model_config("tiny"), ResidualConfig(variant="baseline", contraction="learned")).eval()
    tok = tokens(model.cfg)
    assert max_diff(model, to_hf(model), tok) <= TOL  # weight 1: the identity
    with torch.no_grad():
        model.contract.static_weight.fill_(2.0)
    with pytest.raises(ValueError, match="contraction"):
        to_hf(model)


# ---------------------------------------------------------------------------------- from_hf


@pytest.mark.parametrize("case", CASES)
def test_round_trip_is_lossless(case):
    model = baseline(case)
    back = from_hf(to_hf(model), name=model.cfg.name).eval()
    assert back.cfg == model.cfg and back.rcfg.variant == "baseline"
    assert_same_state(model.state_dict(), back.state_dict())
    tok = tokens(model.cfg)
    with torch.no_grad():
        assert torch.equal(model(tok).logits, back(tok).logits)


HF_CASES = {
    "default": {},
    "q_lora_groups": dict(cfg_overrides=dict(q_lora_rank=16), n_group=2, topk_group=2, routed_scaling_factor=2.5),
    "rotate_half_rope": dict(rope_interleave=False),
    "no_dense": dict(cfg_overrides=dict(n_dense_layers=0), norm_topk_prob=False),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_from_hf_of_fresh_hf_model(case):
    hf = fresh_hf(**HF_CASES[case])
    model = from_hf(hf).eval()
    diff = max_diff(model, hf, tokens(model.cfg))
    print(f"from_hf[{case}]: max |logit diff| = {diff:.3e}")
    assert diff <= TOL
    # and back: the HF state is reproduced exactly, in the HF model's RoPE layout
    again = to_hf(model, rope_interleave=hf.config.rope_interleave)
    assert_same_state(hf.state_dict(), again.state_dict())


def test_rotate_half_rope_is_permuted_not_copied():
    # With rope_interleave=False the RoPE rows must be permuted: a plain copy gives other logits.
    hf = fresh_hf(rope_interleave=False)
    model = from_hf(hf).eval()
    hf_interleaved = fresh_hf(rope_interleave=True)
    hf_interleaved.load_state_dict(hf.state_dict())
    tok = tokens(model.cfg)
    assert max_diff(model, hf, tok) <= TOL < max_diff(model, hf_interleaved, tok)


def test_save_pretrained_and_reload(tmp_path):
    model = baseline("q_lora")  # norm_eps 1e-6: HF's reload keeps the maths (see mhc_train.model.hf)
    to_hf(model).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="sdpa", experts_implementation="eager", dtype=torch.float32).eval()
    assert isinstance(hf, DeepseekV3ForCausalLM)
    diff = max_diff(model, hf, tokens(model.cfg))
    print(f"save_pretrained/from_pretrained: max |logit diff| = {diff:.3e}")
    assert diff <= TOL
    back = from_hf(hf, name=model.cfg.name)
    assert back.cfg == model.cfg
    assert_same_state(model.state_dict(), back.state_dict())


@pytest.mark.parametrize("variant", ["hc", "mhc"])
def test_from_hf_into_multi_stream_model(variant):
    # The connections keep their init, which (HC's Pre-Norm equivalence, our mHC defaults)
    # computes what the baseline does; with eps 1e-20 the final norm hides the stream sum.
    hf = fresh_hf(rms_norm_eps=1e-20)
    set_norm_eps(hf, 1e-20)
    model = from_hf(hf, residual=ResidualConfig(variant=variant)).eval()
    assert model.n_streams == 4 and model.rcfg.variant == variant
    assert any("_conn." in k for k in model.state_dict())
    diff = max_diff(model, hf, tokens(model.cfg))
    print(f"from_hf[{variant}]: max |logit diff| = {diff:.3e}")
    assert diff <= TOL


UNSUPPORTED = {
    "n_group": dict(n_group=2, topk_group=1),
    "rope_type": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 32}),
    "attention_bias": dict(attention_bias=True),
    "tie_word_embeddings": dict(tie_word_embeddings=True),
    "num_key_value_heads": dict(num_key_value_heads=2),
    "hidden_act": dict(hidden_act="gelu"),
    "eps": dict(rms_norm_eps=1e-5),  # q_a/kv_a_layernorm keep HF's hard-coded 1e-6
}


@pytest.mark.parametrize("option", UNSUPPORTED)
def test_from_hf_rejects_unsupported_options(option):
    hf = fresh_hf(**UNSUPPORTED[option])
    with pytest.raises(ValueError, match=option):
        from_hf(hf)


def test_from_hf_rejects_bad_arguments():
    hf = fresh_hf()
    with pytest.raises(ValueError, match="dim"):
        from_hf(hf, dim=32)  # architecture comes from the HF config
    assert from_hf(hf, seq_aux_loss_coef=1e-4, name="x").cfg.seq_aux_loss_coef == 1e-4
    assert set(TRAINING_FIELDS) <= set(load_model_config("tiny").to_dict())
    with pytest.raises(TypeError):
        from_hf(torch.nn.Linear(2, 2))
