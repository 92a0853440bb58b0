"""Manifold-Constrained Hyper-Connections (mHC, arXiv 2512.24880, Eq 7-9 in the kernel form 14-19).

Per token, the n streams are flattened to one nC vector; one projection phi [nC, n^2+2n]
gives the pre, post and res logits, scaled by 1/RMS (after the matmul), gated by alpha and
shifted by a bias. H_pre = sigmoid, H_post = 2 sigmoid, H_res = Sinkhorn-Knopp(exp(.)).
"""

from __future__ import annotations

import torch
from torch import nn

from mhc_train.residual.base import ResidualConnection
from mhc_train.residual.config import ResidualConfig
from mhc_train.residual.ops import (
    apply_post,
    apply_post_res,
    apply_pre,
    mapping_width,
    mhc_mappings,
    mhc_pre_mappings,
    mhc_read_res_mix,
    resolve_backend,
)


def mhc_bias_init(cfg: ResidualConfig, home: int) -> torch.Tensor:
    """Initial bias [pre (n) | post (n) | res (n*n row-major)], logits before the nonlinearity."""
    n = cfg.n
    pre = torch.full((n,), cfg.pre_bias_other)
    pre[home] = cfg.pre_bias_home
    post = torch.full((n,), cfg.post_bias)
    res = torch.full((n, n), cfg.res_bias_off)
    res.fill_diagonal_(cfg.res_bias_diag)
    return torch.cat([pre, post, res.flatten()])


class ManifoldHyperConnection(ResidualConnection):
    """mHC connection of one sublayer; ``layer_index`` counts sublayers (attn, ffn, attn, ...)."""

    def __init__(self, cfg: ResidualConfig, dim: int, layer_index: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.n = n = cfg.n
        self.dim = dim
        self.layer_index = layer_index
        width = mapping_width(n)
        # Mapping parameters stay fp32 even in a bf16 model (see ops: fp32 mapping maths).
        self.phi = nn.Parameter(torch.zeros(n * dim, width))
        self.alpha = nn.Parameter(torch.full((3,), cfg.alpha_init))
        self.bias = nn.Parameter(mhc_bias_init(cfg, home=layer_index % n))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.cfg.phi_init_std > 0:
                self.phi.normal_(0.0, self.cfg.phi_init_std)
            else:
                self.phi.zero_()
            self.alpha.fill_(self.cfg.alpha_init)
            self.bias.copy_(mhc_bias_init(self.cfg, home=self.layer_index % self.n))

    def mappings(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        h_pre, h_post, h_res = mhc_mappings(
            streams, self.phi, self.alpha, self.bias, cfg.t_max, eps=cfg.rms_eps, backend=cfg.backend
        )
        return fix_mappings(cfg, h_pre, h_post, h_res)

    def read(self, streams: torch.Tensor):
        cfg = self.cfg
        res_x = None
        if cfg.fix_pre:  # H_pre is replaced before it is applied: no fused pre
            h_pre, h_post, h_res = self.mappings(streams)
            u = apply_pre(streams, h_pre, backend=cfg.backend)
        elif self._res_mix_in_read(streams):
            u, _, h_post, h_res, res_x = mhc_read_res_mix(
                streams, self.phi, self.alpha, self.bias, cfg.t_max, eps=cfg.rms_eps
            )
        else:
            u, h_pre, h_post, h_res = mhc_pre_mappings(
                streams, self.phi, self.alpha, self.bias, cfg.t_max, eps=cfg.rms_eps, backend=cfg.backend
            )
            _, h_post, h_res = fix_mappings(cfg, h_pre, h_post, h_res)
        self._record(h_res)
        return u, (h_post, h_res, res_x)

    def write(self, streams: torch.Tensor, y: torch.Tensor, mix) -> torch.Tensor:
        h_post, h_res, res_x = mix
        if res_x is not None:
            return apply_post(res_x, y, h_post, streams.dtype)
        return apply_post_res(streams, y, h_post, h_res, backend=self.cfg.backend)

    def _res_mix_in_read(self, streams: torch.Tensor) -> bool:
        """The torch backend mixes the streams in the read (``mhc_read_res_mix``) unless an
        ablation replaces H_post or H_res; the Triton kernels keep ``apply_post_res``."""
        cfg = self.cfg
        return resolve_backend(cfg.backend, streams.device) == "torch" and not (cfg.fix_post or cfg.fix_res)


def fix_mappings(cfg: ResidualConfig, h_pre: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor):
    """Apply the Table 1 ablation switches: pre -> 1/n, post -> ones, res -> identity."""
    n = h_pre.shape[-1]
    if cfg.fix_pre:
        h_pre = torch.full_like(h_pre, 1.0 / n)
    if cfg.fix_post:
        h_post = torch.ones_like(h_post)
    if cfg.fix_res:
        h_res = torch.eye(n, dtype=h_res.dtype, device=h_res.device).expand_as(h_res)
    return h_pre, h_post, h_res
