"""Residual connections: baseline, Hyper-Connections (HC) and Manifold-Constrained HC (mHC).

Public functional API (stable; the Triton kernels implement exactly these):
``sinkhorn_knopp``, ``mhc_mappings``, ``apply_pre``, ``apply_post_res``, ``amax_gain``.
"""

from mhc_train.residual.base import BaselineResidual, ResidualConnection
from mhc_train.residual.config import ResidualConfig
from mhc_train.residual.gains import GainReport, composite_gains
from mhc_train.residual.hyper import HyperConnection
from mhc_train.residual.manifold import ManifoldHyperConnection
from mhc_train.residual.ops import (
    amax_gain,
    apply_post_res,
    apply_pre,
    mhc_mappings,
    mhc_pre_mappings,
    sinkhorn_knopp,
)
from mhc_train.residual.streams import StreamContraction, activation_dtype, expand_streams, stream_dtype


def build_connection(cfg: ResidualConfig, dim: int, layer_index: int, norm_eps: float = 1e-6) -> ResidualConnection:
    """The connection of sublayer ``layer_index`` (0-based, attention and FFN counted apart)."""
    if cfg.variant == "baseline":
        return BaselineResidual()
    if cfg.variant == "hc":
        return HyperConnection(cfg, dim, layer_index, norm_eps=norm_eps)
    return ManifoldHyperConnection(cfg, dim, layer_index)


__all__ = [
    "BaselineResidual",
    "GainReport",
    "HyperConnection",
    "ManifoldHyperConnection",
    "ResidualConfig",
    "ResidualConnection",
    "StreamContraction",
    "amax_gain",
    "apply_post_res",
    "apply_pre",
    "build_connection",
    "composite_gains",
    "activation_dtype",
    "expand_streams",
    "stream_dtype",
    "mhc_mappings",
    "mhc_pre_mappings",
    "sinkhorn_knopp",
]
