"""Model summary without allocating the model: parameters, FLOPs and residual-stream memory.

The model is built under ``torch.device("meta")`` (shapes only, no storage), then every
parameter is classified by the module that owns it:

    embedding       the token embedding table (nn.Embedding)
    attention       MLA projections (wq / wq_a / wq_b, wkv_a, wkv_b, wo)
    dense_ffn       the SwiGLU FFN of the leading dense blocks
    routed_experts  the stacked weights of the routed experts (RoutedExperts)
    shared_experts  the SwiGLU of the shared experts inside an MoE
    router          the expert-affinity matrix of each MoE router
    norms           every RMSNorm of the model proper (pre-sublayer, MLA q/kv, final)
    residual        the connections (mHC phi / alpha / bias; HC static and dynamic maps,
                    their RMSNorm) and the learned stream contraction
    head            the untied output projection

Counting convention ("active" = parameters one token's forward pass multiplies with):
routed experts count n_activated / n_routed of their total, the embedding table counts 0
(it is a lookup, not a matmul), everything else counts fully (the head included). With this
definition the mHC (n = 4) models of configs/model/{3b,9b,27b}.yaml land inside the rounding
of every figure of the mHC paper's Table 5 (arXiv 2512.24880: 2.97B / 9.18B / 27.0B total,
612M / 1.66B / 4.14B active), and the baselines within 0.5% of them; counting the embedding
as active would overshoot by 165M / 248M / 331M (27% / 15% / 8%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mhc_train.model.attention import MLA
from mhc_train.model.config import ModelConfig
from mhc_train.model.ffn import SwiGLU
from mhc_train.model.moe import MoE, RoutedExperts, Router
from mhc_train.model.transformer import MHCTransformer
from mhc_train.norm import RMSNorm
from mhc_train.residual import (
    HyperConnection,
    ManifoldHyperConnection,
    ResidualConfig,
    ResidualConnection,
    StreamContraction,
)

COMPONENTS = (
    "embedding",
    "attention",
    "dense_ffn",
    "routed_experts",
    "shared_experts",
    "router",
    "norms",
    "residual",
    "head",
)

# mHC paper Table 5: (total, active) parameters of the three model sizes, as printed ...
PAPER_TABLE5 = {
    "3b": (2.97e9, 612e6),
    "9b": (9.18e9, 1.66e9),
    "27b": (27.0e9, 4.14e9),
}
# ... and half a unit of each figure's last printed digit: the exact count lies within it.
PAPER_TABLE5_ROUNDING = {
    "3b": (0.005e9, 0.5e6),
    "9b": (0.005e9, 0.005e9),
    "27b": (0.05e9, 0.005e9),
}


# ------------------------------------------------------------------------------------ building


def build_meta_model(model_cfg: ModelConfig, residual_cfg: ResidualConfig) -> MHCTransformer:
    """``MHCTransformer`` built under ``torch.device("meta")``: every parameter has its shape,
    none has storage. (The model skips ``init_weights`` on meta parameters.)
    """
    with torch.device("meta"):
        return MHCTransformer(model_cfg, residual_cfg)


# ---------------------------------------------------------------------------- classification


def _component_of(chain: list[nn.Module], model: nn.Module) -> str | None:
    """Component of a parameter owned directly by ``chain[-1]``; ``chain`` runs from the root."""
    owner = chain[-1]
    if any(isinstance(m, (ResidualConnection, StreamContraction)) for m in chain):
        return "residual"  # before norms: HC's own RMSNorm belongs to its connection
    if isinstance(owner, RMSNorm):
        return "norms"
    if any(isinstance(m, RoutedExperts) for m in chain):
        return "routed_experts"
    if any(isinstance(m, Router) for m in chain):
        return "router"
    if any(isinstance(m, SwiGLU) for m in chain):
        return "shared_experts" if any(isinstance(m, MoE) for m in chain) else "dense_ffn"
    if any(isinstance(m, MLA) for m in chain):
        return "attention"
    if isinstance(owner, nn.Embedding):
        return "embedding"
    if owner is getattr(model, "head", None):
        return "head"
    return None


def _walk(model: nn.Module):
    """Yield (qualified name, parameter, ancestor chain) once per distinct parameter."""
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str, chain: list[nn.Module]):
        chain = chain + [module]
        for pname, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield f"{prefix}{pname}", p, chain
        for cname, child in module.named_children():
            yield from visit(child, f"{prefix}{cname}.", chain)

    yield from visit(model, "", [])


def classify_parameters(model: nn.Module) -> dict[str, str]:
    """Qualified parameter name -> component. Raises ValueError on any parameter no rule claims."""
    out: dict[str, str] = {}
    for name, _, chain in _walk(model):
        component = _component_of(chain, model)
        if component is None:
            raise ValueError(f"parameter {name!r} ({type(chain[-1]).__name__}) fits no component")
        out[name] = component
    return out


def _top_k(model: nn.Module) -> int:
    return model.cfg.n_activated_experts


def _active_numel(p: torch.Tensor, component: str, k: int) -> int:
    if component == "embedding":
        return 0
    if component == "routed_experts":
        n_experts = p.shape[0]  # RoutedExperts stacks [E, ...]
        return p.numel() // n_experts * k
    return p.numel()


def parameter_table(model: MHCTransformer) -> dict[str, dict[str, int]]:
    """Per component ``{"total": int, "active": int}``, in ``COMPONENTS`` order, plus ``"total"``.

    Every parameter lands in exactly one component (asserted: the component totals sum to
    the model's own parameter count).
    """
    k = _top_k(model)
    table = {c: {"total": 0, "active": 0} for c in COMPONENTS}
    for name, p, chain in _walk(model):
        component = _component_of(chain, model)
        if component is None:
            raise ValueError(f"parameter {name!r} ({type(chain[-1]).__name__}) fits no component")
        table[component]["total"] += p.numel()
        table[component]["active"] += _active_numel(p, component, k)
    total = sum(row["total"] for row in table.values())
    model_total = sum(p.numel() for p in model.parameters())
    assert total == model_total, f"classified {total} parameters, the model has {model_total}"
    table["total"] = {"total": total, "active": sum(row["active"] for row in table.values())}
    return table


def residual_parameter_detail(model: nn.Module) -> dict[str, int]:
    """The residual component split by parameter name (phi, alpha, bias, static_alpha, ...)."""
    detail: dict[str, int] = {}
    for name, p, chain in _walk(model):
        if _component_of(chain, model) != "residual":
            continue
        owner = chain[-1]
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(owner, RMSNorm):
            leaf = "norm.weight"
        elif isinstance(owner, StreamContraction):
            leaf = f"contraction.{leaf}"
        detail[leaf] = detail.get(leaf, 0) + p.numel()
    return detail


def matmul_macs_per_token(model: MHCTransformer) -> int:
    """Multiply-accumulates per token of every weight matmul (the embedding lookup has none).

    Linear weights (attention, FFNs, shared experts, head), the router and the mHC projection
    phi count once; routed experts count top-k / E of their weights; HC's dynamic maps act on
    each of the n streams separately, so they count n times their size.
    """
    k = _top_k(model)
    macs = 0
    for name, p, chain in _walk(model):
        owner, leaf = chain[-1], name.rsplit(".", 1)[-1]
        if isinstance(owner, RoutedExperts):
            macs += p.numel() // p.shape[0] * k
        elif isinstance(owner, nn.Linear) and leaf == "weight":
            macs += p.numel()
        elif isinstance(owner, Router) and leaf == "weight":
            macs += p.numel()
        elif isinstance(owner, ManifoldHyperConnection) and leaf == "phi":
            macs += p.numel()
        elif isinstance(owner, HyperConnection) and leaf in ("dynamic_alpha_fn", "dynamic_beta_fn"):
            macs += owner.n * p.numel()
    return macs


# ------------------------------------------------------------------------------------- FLOPs


@dataclass
class FlopsPerToken:
    seq_len: int
    matmul: float  # 2 x matmul MACs per token
    attention: float  # scores and weighted values
    connections: float  # residual / HC / mHC elementwise work, Sinkhorn, stream contraction

    @property
    def forward(self) -> float:
        return self.matmul + self.attention + self.connections

    @property
    def training(self) -> float:
        return 3.0 * self.forward


def connection_flops_per_token(model_cfg: ModelConfig, residual_cfg: ResidualConfig) -> float:
    """Elementwise work of the 2L connections and the final contraction, per token."""
    c, n_sub = model_cfg.dim, model_cfg.n_sublayers
    n = residual_cfg.streams
    if residual_cfg.variant == "baseline":
        per_sublayer = c  # x + F(x)
    else:
        per_sublayer = 2 * n * c  # apply_pre: sum_i h_pre[i] x_i
        per_sublayer += 2 * n * n * c + 2 * n * c  # apply_post_res: h_res x + h_post^T y
        if residual_cfg.variant == "mhc":
            per_sublayer += 4 * n * n * residual_cfg.t_max  # Sinkhorn: t_max x (column + row) passes
    contraction = {"sum": (n - 1) * c, "mean": n * c, "learned": 2 * n * c}[residual_cfg.contraction]
    return float(n_sub * per_sublayer + contraction)


def flops_per_token(
    model_cfg: ModelConfig,
    residual_cfg: ResidualConfig,
    seq_len: int,
    model: MHCTransformer | None = None,
) -> FlopsPerToken:
    """Forward FLOPs per token (training = 3 x forward) at sequence length ``seq_len``.

    forward = 2 * M                                   weight matmuls, M = matmul_macs_per_token
                                                      (head and mHC phi included, routed experts
                                                      at top-k / E, HC dynamic maps x n streams)
            + L * 2 * H * (d_qk + d_v) * S / 2        attention: QK^T (d_qk = nope + rope dims)
                                                      and P.V (d_v) against the causal average
                                                      context S / 2, 2 FLOPs per MAC
            + 2L * conn + contraction                 connections per sublayer: baseline C
                                                      (the add); HC / mHC apply_pre 2nC +
                                                      apply_post_res (2n^2 C + 2nC); mHC adds
                                                      Sinkhorn 4 n^2 t_max; contraction sum
                                                      (n-1)C, mean nC, learned 2nC

    Left out as small: norms, activations, softmax, RoPE, sigmoid / tanh / RMS of the maps.
    ``model``: an already-built (meta) model of these configs, to skip building one.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    if model is None:
        model = build_meta_model(model_cfg, residual_cfg)
    matmul = 2.0 * matmul_macs_per_token(model)
    h = model_cfg.n_heads
    attention = model_cfg.n_layers * 2.0 * h * (model_cfg.qk_head_dim + model_cfg.v_head_dim) * seq_len / 2
    return FlopsPerToken(seq_len, matmul, attention, connection_flops_per_token(model_cfg, residual_cfg))


# ------------------------------------------------------------------------------------ memory


@dataclass
class ResidualStreamMemory:
    """Per-token activation memory of the residual streams (elements and bytes)."""

    n: int
    dim: int
    n_sublayers: int  # L = 2 * n_layers
    bytes_per_element: int
    recompute_block: int  # L_r*, Eq 20
    no_recompute_elements: int  # n*C kept at every one of the L sublayer inputs
    recompute_elements: int  # Table 3: n*C*ceil(L/L_r) + (n+2)*C*L_r

    @property
    def no_recompute_bytes(self) -> int:
        return self.no_recompute_elements * self.bytes_per_element

    @property
    def recompute_bytes(self) -> int:
        return self.recompute_elements * self.bytes_per_element


def optimal_recompute_block(n: int, n_sublayers: int) -> int:
    """L_r* = round(sqrt(n L / (n + 2))) (mHC Eq 20), at least 1 and at most L."""
    exact = math.sqrt(n * n_sublayers / (n + 2))
    return min(n_sublayers, max(1, math.floor(exact + 0.5)))


def residual_stream_memory(
    model_cfg: ModelConfig, residual_cfg: ResidualConfig, bytes_per_element: int = 2
) -> ResidualStreamMemory:
    """Residual-stream activations per token kept for backward.

    Without recomputation: the n x C streams at the input of each of the L = 2 * n_layers
    sublayers, n*C*L elements. With the mHC paper's recomputation (section 4.3.2, Table 3):
    only the first stream tensor of each block of L_r sublayers is kept, and one block's
    (n+2)*C per sublayer is alive while it is recomputed: n*C*ceil(L/L_r) + (n+2)*C*L_r,
    at L_r* of Eq 20.
    """
    n, c, L = residual_cfg.streams, model_cfg.dim, model_cfg.n_sublayers
    lr = optimal_recompute_block(n, L)
    return ResidualStreamMemory(
        n=n,
        dim=c,
        n_sublayers=L,
        bytes_per_element=bytes_per_element,
        recompute_block=lr,
        no_recompute_elements=n * c * L,
        recompute_elements=n * c * math.ceil(L / lr) + (n + 2) * c * lr,
    )
