"""Conversion to and from transformers' ``DeepseekV3ForCausalLM``.

    hf = to_hf(model)          # baseline MHCTransformer -> DeepseekV3ForCausalLM (float32, eval)
    model = from_hf(hf)        # DeepseekV3ForCausalLM -> baseline MHCTransformer
    model = from_hf(hf, residual=ResidualConfig(variant="hc"))   # HF weights in a multi-stream model

Only the baseline residual (one stream, ``x + F(x)``) is a DeepSeek-V3: an HC/mHC model has
stream mappings that the HF architecture cannot hold, so ``to_hf`` refuses it. The other way
round, the HF weights can seed a multi-stream model whose connections keep their own init.

The two models compute the same function (logits agree to float32 rounding):

* MLA: ``q_proj`` / ``q_a_proj`` + ``q_a_layernorm`` + ``q_b_proj`` <-> ``wq`` / ``wq_a`` +
  ``q_norm`` + ``wq_b``; ``kv_a_proj_with_mqa`` + ``kv_a_layernorm`` + ``kv_b_proj`` <->
  ``wkv_a`` + ``kv_norm`` + ``wkv_b``; ``o_proj`` <-> ``wo``; scaling ``qk_head_dim ** -0.5``.
* RoPE: both use DeepSeek's interleaved-pair layout (``rope_interleave=True``). An HF model with
  ``rope_interleave=False`` (rotate-half pairs ``(j, j + d/2)``) is converted by permuting the
  RoPE rows of the query and key projections, which gives the same attention scores exactly.
* Router: sigmoid scores, top-k on ``scores + e_score_correction_bias`` (our ``expert_bias``),
  weights from the unbiased scores, optionally normalised, times ``routed_scaling_factor``
  (our ``route_scale``). Group-limited routing is off on our side: ``n_group = topk_group = 1``
  (an HF model with ``topk_group == n_group`` selects every group, so it converts too).
* Experts: ``gate_up_proj [E, 2F, C] = cat(w1, w3)`` along F, ``down_proj [E, C, F] = w2``;
  shared experts are one SwiGLU of width ``n_shared_experts * moe_intermediate_size``.
* RMSNorm eps: HF builds ``q_a_layernorm`` and ``kv_a_layernorm`` with a hard-coded eps of
  1e-6 whatever ``rms_norm_eps`` says; ours use ``norm_eps`` everywhere. ``to_hf`` therefore
  sets ``variance_epsilon`` of every HF norm module to ``norm_eps`` after construction. That is
  module state, not config: an HF model saved and reloaded with ``from_pretrained`` gets 1e-6
  back in those two norms (the same maths whenever ``norm_eps == 1e-6``, as for DeepSeek-V3).
  ``from_hf`` reads the eps of the modules and raises if they are not all equal.

What remains is float32 rounding (max |logit diff| 0 to ~1e-7 on the tiny sizes): HF's expert
loop feeds each expert its tokens in (top-k slot, token) order, ours in token order, and the
GEMM rounds a row a little differently depending on where it sits in the batch.
``save_pretrained`` writes HF's per-expert checkpoint layout; ``from_pretrained`` reads it back.
"""

from __future__ import annotations

import contextlib
import torch
from torch import nn

from mhc_train.model.config import ModelConfig
from mhc_train.model.transformer import MHCTransformer
from mhc_train.residual import ResidualConfig

# ModelConfig fields the HF config does not describe (training-only); from_hf takes them as overrides.
TRAINING_FIELDS = ("name", "bias_update_speed", "seq_aux_loss_coef", "init_std", "scale_out_init", "max_seq_len",
                   "loss_chunk_tokens")


def _transformers():
    try:
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ImportError("mhc_train.model.hf needs transformers>=5 (DeepseekV3ForCausalLM)") from e
    return DeepseekV3Config, DeepseekV3ForCausalLM


# --------------------------------------------------------------------------------- configs


def hf_config(cfg: ModelConfig, **overrides):
    """The ``DeepseekV3Config`` of ``cfg``; ``overrides`` (e.g. ``bos_token_id``) go to it last."""
    DeepseekV3Config, _ = _transformers()
    n_moe = cfg.n_layers - cfg.n_dense_layers
    if n_moe > 0 and cfg.n_routed_experts < 2:
        # HF's router always ranks groups by their top-2 scores, even with a single group.
        raise ValueError(
            f"model.n_routed_experts: DeepseekV3 needs >= 2 routed experts, got {cfg.n_routed_experts}")
    if cfg.qk_rope_head_dim == 0:
        raise ValueError("model.qk_rope_head_dim: DeepseekV3 needs a RoPE slice (> 0), got 0")
    values = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim_dense,
        moe_intermediate_size=cfg.moe_ffn_dim,
        num_hidden_layers=cfg.n_layers,
        first_k_dense_replace=cfg.n_dense_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank if cfg.q_lora_rank > 0 else None,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        rope_interleave=True,
        max_position_embeddings=cfg.max_seq_len,
        n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.n_activated_experts,
        n_shared_experts=cfg.n_shared_experts,
        routed_scaling_factor=float(cfg.route_scale),
        norm_topk_prob=bool(cfg.norm_topk_prob),
        n_group=1,
        topk_group=1,
        rms_norm_eps=float(cfg.norm_eps),
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        initializer_range=float(cfg.init_std),
        num_mtp_layers=0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        dtype="float32",
    )
    values.update(overrides)
    return DeepseekV3Config(**values)


def _hf_get(config, name: str, default=None):
    return getattr(config, name, default)


def model_config_from_hf(config, norm_eps: float | None = None, **overrides) -> ModelConfig:
    """Our ``ModelConfig`` of a ``DeepseekV3Config``; ValueError naming any option we cannot represent.

    ``norm_eps``: the eps of the norms (default ``rms_norm_eps``; ``from_hf`` passes the one the
    modules actually use). ``overrides``: training-only fields (``TRAINING_FIELDS``).
    """
    bad_keys = sorted(set(overrides) - set(TRAINING_FIELDS))
    if bad_keys:
        raise ValueError(f"from_hf: only training fields {TRAINING_FIELDS} may be overridden, got {bad_keys}")
    model_type = _hf_get(config, "model_type")
    if model_type != "deepseek_v3":
        raise ValueError(f"model_type: expected a deepseek_v3 config, got {model_type!r}")

    def unsupported(option: str, value, why: str) -> None:
        raise ValueError(f"HF config option {option}={value!r} is not supported: {why}")

    heads = config.num_attention_heads
    kv_heads = _hf_get(config, "num_key_value_heads") or heads
    if kv_heads != heads:
        unsupported("num_key_value_heads", kv_heads, f"MLA here has one KV head per query head ({heads})")
    if _hf_get(config, "attention_bias", False):
        unsupported("attention_bias", True, "our MLA projections have no bias")
    if _hf_get(config, "tie_word_embeddings", False):
        unsupported("tie_word_embeddings", True, "our head is untied from the embedding")
    act = _hf_get(config, "hidden_act", "silu")
    if act != "silu":
        unsupported("hidden_act", act, "our FFNs and experts are SwiGLU (silu)")
    rope = dict(_hf_get(config, "rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        unsupported("rope_parameters.rope_type", rope_type,
                    "only plain RoPE is implemented (no yarn/linear/dynamic scaling)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        unsupported("rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"],
                    "RoPE covers the whole rope slice")
    theta = rope.get("rope_theta", _hf_get(config, "rope_theta"))
    if theta is None:
        raise ValueError("rope_parameters.rope_theta: missing in the HF config")
    n_group, topk_group = _hf_get(config, "n_group") or 1, _hf_get(config, "topk_group") or 1
    n_moe = config.num_hidden_layers - (_hf_get(config, "first_k_dense_replace") or 0)
    if n_moe > 0 and n_group > 1 and topk_group < n_group:
        unsupported("n_group", n_group,
                    f"group-limited routing (topk_group={topk_group} < n_group={n_group}) is not implemented")
    q_lora_rank = _hf_get(config, "q_lora_rank")
    if q_lora_rank is not None and q_lora_rank < 1:
        unsupported("q_lora_rank", q_lora_rank, "use None for no query compression")
    if _hf_get(config, "attention_dropout", 0.0):
        unsupported("attention_dropout", config.attention_dropout, "our attention has no dropout")

    n_act, n_shared = config.num_experts_per_tok, config.n_shared_experts or 0
    moe_dim = config.moe_intermediate_size
    dense_dim = config.intermediate_size
    values = dict(
        vocab_size=config.vocab_size,
        dim=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_dense_layers=_hf_get(config, "first_k_dense_replace") or 0,
        n_heads=heads,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        kv_lora_rank=config.kv_lora_rank,
        q_lora_rank=q_lora_rank or 0,
        rope_theta=float(theta),
        max_seq_len=config.max_position_embeddings,
        n_routed_experts=config.n_routed_experts,
        n_activated_experts=n_act,
        n_shared_experts=n_shared,
        moe_ffn_dim=moe_dim,
        dense_ffn_dim=0 if dense_dim == (n_act + n_shared) * moe_dim else dense_dim,
        route_scale=float(config.routed_scaling_factor),
        norm_topk_prob=bool(config.norm_topk_prob),
        norm_eps=float(config.rms_norm_eps if norm_eps is None else norm_eps),
        init_std=float(_hf_get(config, "initializer_range", ModelConfig.init_std)),
        name=_hf_get(config, "_name_or_path", "") or "hf",
    )
    values.update(overrides)
    return ModelConfig(**values)


# ------------------------------------------------------------------------------- weights


def _rope_perm(rope_dim: int) -> torch.Tensor:
    """perm[r]: the rotate-half (non-interleaved) index held by interleaved index r."""
    half = rope_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()


def _rope_rows(cfg: ModelConfig, head_width: int, n_heads: int, offset: int) -> torch.Tensor:
    """Row indices of the RoPE slices of a projection, per head (``offset`` into each head)."""
    dr = cfg.qk_rope_head_dim
    return torch.cat([h * head_width + offset + torch.arange(dr) for h in range(n_heads)])


def _permute_rope(weight: torch.Tensor, rows: torch.Tensor, perm: torch.Tensor, dr: int) -> torch.Tensor:
    """``weight`` with its rope rows (groups of ``dr``) reordered by ``perm`` within each group."""
    out = weight.clone()
    groups = rows.view(-1, dr)
    out[groups.flatten()] = weight[groups[:, perm].flatten()]
    return out


def _mapping(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our key, HF key) of every plainly copied tensor; experts are handled apart."""
    pairs = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
             ("head.weight", "lm_head.weight")]
    for i in range(cfg.n_layers):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        pairs += [(ours + "attn_norm.weight", hf + "input_layernorm.weight"),
                  (ours + "ffn_norm.weight", hf + "post_attention_layernorm.weight")]
        att, hatt = ours + "attn.", hf + "self_attn."
        if cfg.q_lora_rank > 0:
            pairs += [(att + "wq_a.weight", hatt + "q_a_proj.weight"),
                      (att + "q_norm.weight", hatt + "q_a_layernorm.weight"),
                      (att + "wq_b.weight", hatt + "q_b_proj.weight")]
        else:
            pairs.append((att + "wq.weight", hatt + "q_proj.weight"))
        pairs += [(att + "wkv_a.weight", hatt + "kv_a_proj_with_mqa.weight"),
                  (att + "kv_norm.weight", hatt + "kv_a_layernorm.weight"),
                  (att + "wkv_b.weight", hatt + "kv_b_proj.weight"),
                  (att + "wo.weight", hatt + "o_proj.weight")]
        ffn, hffn = ours + "ffn.", hf + "mlp."
        if i < cfg.n_dense_layers:
            pairs += [(ffn + "w1.weight", hffn + "gate_proj.weight"),
                      (ffn + "w3.weight", hffn + "up_proj.weight"),
                      (ffn + "w2.weight", hffn + "down_proj.weight")]
        else:
            pairs += [(ffn + "router.weight", hffn + "gate.weight"),
                      (ffn + "router.expert_bias", hffn + "gate.e_score_correction_bias")]
            if cfg.n_shared_experts:
                pairs += [(ffn + "shared.w1.weight", hffn + "shared_experts.gate_proj.weight"),
                          (ffn + "shared.w3.weight", hffn + "shared_experts.up_proj.weight"),
                          (ffn + "shared.w2.weight", hffn + "shared_experts.down_proj.weight")]
    return pairs


def _rope_keys(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our key -> row indices of its RoPE slices (query projection per head, shared key)."""
    qk = cfg.qk_head_dim
    q_rows = _rope_rows(cfg, qk, cfg.n_heads, cfg.qk_nope_head_dim)
    k_rows = _rope_rows(cfg, 0, 1, cfg.kv_lora_rank)
    keys = {}
    for i in range(cfg.n_layers):
        att = f"blocks.{i}.attn."
        keys[att + ("wq_b.weight" if cfg.q_lora_rank > 0 else "wq.weight")] = q_rows
        keys[att + "wkv_a.weight"] = k_rows
    return keys


def hf_state_dict(model: MHCTransformer, rope_interleave: bool = True) -> dict[str, torch.Tensor]:
    """The ``DeepseekV3ForCausalLM`` state dict of a baseline model (new tensors, same dtype)."""
    _check_exportable(model)
    cfg = model.cfg
    ours = model.state_dict()
    out = {hf: ours[k].detach().clone() for k, hf in _mapping(cfg)}
    for i in range(cfg.n_dense_layers, cfg.n_layers):
        p = f"blocks.{i}.ffn.experts."
        hp = f"model.layers.{i}.mlp.experts."
        out[hp + "gate_up_proj"] = torch.cat([ours[p + "w1"], ours[p + "w3"]], dim=1).detach().clone()
        out[hp + "down_proj"] = ours[p + "w2"].detach().clone()
        if not cfg.n_shared_experts:  # HF still builds the shared SwiGLU, zero wide: output 0
            sp, w = f"model.layers.{i}.mlp.shared_experts.", ours[p + "w2"]
            out[sp + "gate_proj.weight"] = w.new_zeros(0, cfg.dim)
            out[sp + "up_proj.weight"] = w.new_zeros(0, cfg.dim)
            out[sp + "down_proj.weight"] = w.new_zeros(cfg.dim, 0)
    if not rope_interleave:
        inverse = torch.argsort(_rope_perm(cfg.qk_rope_head_dim))
        hf_of = dict(_mapping(cfg))
        for key, rows in _rope_keys(cfg).items():
            out[hf_of[key]] = _permute_rope(out[hf_of[key]], rows, inverse, cfg.qk_rope_head_dim)
    return out


def _check_exportable(model: MHCTransformer) -> None:
    if not isinstance(model, MHCTransformer):
        raise TypeError(f"to_hf: expected an MHCTransformer, got {type(model).__name__}")
    rcfg = model.rcfg
    if rcfg.variant != "baseline" or model.n_streams != 1:
        raise ValueError(
            f"to_hf: residual.variant={rcfg.variant!r} (n={rcfg.streams}) has stream mappings that "
            "DeepseekV3ForCausalLM cannot represent; only the baseline variant converts")
    if rcfg.contraction == "learned":
        w = model.contract.static_weight.detach()
        if not torch.all(w == 1):
            raise ValueError(
                f"to_hf: residual.contraction='learned' with weight {w.tolist()} scales the stream "
                "before the final norm, which DeepseekV3ForCausalLM cannot represent")


@contextlib.contextmanager
def _skip_init():
    """transformers' ``no_init_weights`` where available (every weight is loaded right after)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older layouts: plain (random) init, then overwritten
        yield
        return
    with no_init_weights():
        yield


def set_norm_eps(hf_model, eps: float) -> None:
    """Set ``variance_epsilon`` of every RMSNorm of an HF DeepSeek-V3 (q/kv_a_layernorm included)."""
    for module in hf_model.modules():
        if hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), nn.Parameter):
            module.variance_epsilon = eps


def to_hf(
    model: MHCTransformer,
    attn_implementation: str = "sdpa",
    experts_implementation: str = "eager",
    rope_interleave: bool = True,
    **config_overrides,
):
    """A float32 ``DeepseekV3ForCausalLM`` in eval mode computing what the baseline ``model`` does.

    ValueError for HC/mHC models (their stream mappings have no HF counterpart). The norm eps of
    ``q_a_layernorm`` / ``kv_a_layernorm`` is set on the modules (see the module docstring).
    ``config_overrides`` go to ``hf_config`` (e.g. ``bos_token_id``, ``eos_token_id``).
    """
    _check_exportable(model)
    _, DeepseekV3ForCausalLM = _transformers()
    cfg = model.cfg
    config = hf_config(cfg, rope_interleave=rope_interleave, **config_overrides)
    with _skip_init():
        hf = DeepseekV3ForCausalLM._from_config(
            config, attn_implementation=attn_implementation,
            experts_implementation=experts_implementation, dtype=torch.float32)
    state = {k: v.float() for k, v in hf_state_dict(model, rope_interleave=rope_interleave).items()}
    device = next(model.parameters()).device
    hf.load_state_dict(state, strict=True)
    set_norm_eps(hf, cfg.norm_eps)
    return hf.to(device=device, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------- from HF


def _norm_eps_of(hf_model) -> float:
    eps: dict[str, float] = {}
    for name, module in hf_model.named_modules():
        if hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), nn.Parameter):
            eps[name] = float(module.variance_epsilon)
    values = set(eps.values())
    if len(values) != 1:
        rms = float(hf_model.config.rms_norm_eps)
        odd = sorted(n for n, e in eps.items() if e != rms)
        raise ValueError(
            f"from_hf: the HF RMSNorms use different eps ({sorted(values)}): rms_norm_eps={rms} but e.g. "
            f"{odd[:2]} use {eps[odd[0]] if odd else '?'} (HF hard-codes 1e-6 in q_a_layernorm/kv_a_layernorm); "
            "our model has one norm_eps. Set the modules' variance_epsilon to one value first "
            "(mhc_train.model.hf.set_norm_eps) if the change is acceptable")
    return values.pop()


def from_hf(hf_model, residual: ResidualConfig | None = None, **overrides) -> MHCTransformer:
    """Our model with the weights of a ``DeepseekV3ForCausalLM``.

    ``residual``: default baseline (computes what ``hf_model`` does). An HC or mHC config gives a
    multi-stream model with the HF weights in every layer and freshly initialised connections.
    ``overrides``: training-only ModelConfig fields (``TRAINING_FIELDS``, e.g. ``name``,
    ``seq_aux_loss_coef``). ValueError naming the option when the HF config uses one we do not
    support. The model is float32 on the device of ``hf_model``, in train mode (as constructed).
    """
    _, DeepseekV3ForCausalLM = _transformers()
    if not isinstance(hf_model, DeepseekV3ForCausalLM):
        raise TypeError(f"from_hf: expected a DeepseekV3ForCausalLM, got {type(hf_model).__name__}")
    config = hf_model.config
    cfg = model_config_from_hf(config, norm_eps=_norm_eps_of(hf_model), **overrides)
    rcfg = residual if residual is not None else ResidualConfig(variant="baseline")
    device = next(hf_model.parameters()).device
    model = MHCTransformer(cfg, rcfg).to(device)

    hf_state = hf_model.state_dict()
    state: dict[str, torch.Tensor] = {k: hf_state[hf] for k, hf in _mapping(cfg)}
    for i in range(cfg.n_dense_layers, cfg.n_layers):
        p, hp = f"blocks.{i}.ffn.experts.", f"model.layers.{i}.mlp.experts."
        state[p + "w1"], state[p + "w3"] = hf_state[hp + "gate_up_proj"].chunk(2, dim=1)
        state[p + "w2"] = hf_state[hp + "down_proj"]
    if not _hf_get(config, "rope_interleave", True):
        perm = _rope_perm(cfg.qk_rope_head_dim)
        for key, rows in _rope_keys(cfg).items():
            state[key] = _permute_rope(state[key], rows, perm, cfg.qk_rope_head_dim)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    loose = [k for k in missing if "_conn." not in k and not k.startswith("contract.")]
    if loose:  # pragma: no cover - the mapping above covers every model tensor
        raise RuntimeError(f"from_hf: no HF tensor for {loose}")
    if rcfg.variant == "baseline" and missing:  # pragma: no cover - baseline has no connection state
        raise RuntimeError(f"from_hf: unexpected missing keys {missing}")
    return model


__all__ = ["TRAINING_FIELDS", "from_hf", "hf_config", "hf_state_dict", "model_config_from_hf",
           "set_norm_eps", "to_hf"]

