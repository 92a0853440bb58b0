"""Hyper-Connections (Zhu et al., arXiv 2409.19606), as in their own paper.

Static maps (learned constants) plus, when ``dynamic``, input-dependent maps
``s * tanh(norm(x_i) W)`` computed from each stream's own C-vector. Init (HC Eq 14,
Algorithm 2): H_pre one-hot at ``layer_index % n``, H_res identity, H_post ones, dynamic
weights zero, scales alpha_init; the network then equals the Pre-Norm baseline.

In HC's notation the width connection is WC = [A_m | A_r] ([n, n+1]) and the depth
connection B ([n]); the layer input is A_m^T H and the carried streams A_r^T H. So
H_pre = A_m, H_post = B and H_res = A_r^T in mHC's convention (out_i = sum_j H_res[i,j] x_j).
"""

from __future__ import annotations

import torch
from torch import nn

from mhc_train.norm import RMSNorm
from mhc_train.residual.base import ResidualConnection
from mhc_train.residual.config import ResidualConfig
from mhc_train.residual.manifold import fix_mappings
from mhc_train.residual.ops import apply_post_res, apply_pre


class HyperConnection(ResidualConnection):
    def __init__(self, cfg: ResidualConfig, dim: int, layer_index: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.cfg = cfg
        self.n = n = cfg.n
        self.layer_index = layer_index
        # "static_" parameters get no weight decay (HC section 2.3 / 5.4).
        self.static_alpha = nn.Parameter(torch.zeros(n, n + 1))  # [A_m | A_r]
        self.static_beta = nn.Parameter(torch.ones(n))  # B
        if cfg.dynamic:
            self.norm = RMSNorm(dim, eps=norm_eps)
            self.dynamic_alpha_fn = nn.Parameter(torch.zeros(dim, n + 1))
            # Shape [1], not a 0-dim scalar: DeepSpeed's start-up broadcast cannot send 0-dim tensors.
            self.dynamic_alpha_scale = nn.Parameter(torch.full((1,), cfg.alpha_init))
            self.dynamic_beta_fn = nn.Parameter(torch.zeros(dim))
            self.dynamic_beta_scale = nn.Parameter(torch.full((1,), cfg.alpha_init))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        n = self.n
        with torch.no_grad():
            self.static_alpha.zero_()
            self.static_alpha[self.layer_index % n, 0] = 1.0
            self.static_alpha[:, 1:] = torch.eye(n)
            self.static_beta.fill_(1.0)
            if self.cfg.dynamic:
                self.norm.reset_parameters()
                self.dynamic_alpha_fn.zero_()
                self.dynamic_beta_fn.zero_()
                self.dynamic_alpha_scale.fill_(self.cfg.alpha_init)
                self.dynamic_beta_scale.fill_(self.cfg.alpha_init)

    def mappings(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lead = streams.shape[:-2]
        n = self.n
        width = self.static_alpha.float().expand(*lead, n, n + 1)
        beta = self.static_beta.float().expand(*lead, n)
        if self.cfg.dynamic:
            normed = self.norm(streams.float())  # per stream, over C
            width = width + self.dynamic_alpha_scale.float() * torch.tanh(normed @ self.dynamic_alpha_fn.float())
            beta = beta + self.dynamic_beta_scale.float() * torch.tanh(normed @ self.dynamic_beta_fn.float())
        h_pre = width[..., 0]
        h_res = width[..., 1:].transpose(-1, -2)
        return fix_mappings(self.cfg, h_pre, beta, h_res)

    def read(self, streams: torch.Tensor):
        h_pre, h_post, h_res = self.mappings(streams)
        self._record(h_res)
        return apply_pre(streams, h_pre), (h_post, h_res)

    def write(self, streams: torch.Tensor, y: torch.Tensor, mix) -> torch.Tensor:
        h_post, h_res = mix
        return apply_post_res(streams, y, h_post, h_res)
