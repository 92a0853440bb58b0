"""Creating the n streams from the embedding and collapsing them before the head."""

from __future__ import annotations

import torch
from torch import nn

from mhc_train.residual.config import ResidualConfig


def stream_dtype(setting: str, h: torch.Tensor) -> torch.dtype:
    """The residual streams' dtype (``residual.stream_dtype``) for embeddings ``h``: ``auto`` is
    autocast's dtype where autocast is on (every layout of a bf16 run holds autocast around its
    forward, so they all agree), else ``h``'s own."""
    if setting == "auto":
        device = h.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    return getattr(torch, setting)


def activation_dtype(setting: str, bf16: bool, param_dtype: torch.dtype) -> torch.dtype:
    """``stream_dtype`` known before any forward (a pipeline's stage-boundary buffers): ``bf16``
    says whether the run's forwards run under bf16 autocast."""
    if setting == "auto":
        return torch.bfloat16 if bf16 else param_dtype
    return getattr(torch, setting)


def expand_streams(h: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, S, C] -> [B, S, n, C]`` by replication (HC section 2.1)."""
    return h.unsqueeze(-2).expand(*h.shape[:-1], n, h.shape[-1]).contiguous()


class StreamContraction(nn.Module):
    """``[B, S, n, C] -> [B, S, C]``: sum (HC), mean, or learned per-stream weights.

    A final RMSNorm follows, so sum and mean differ only through its eps.
    """

    def __init__(self, cfg: ResidualConfig) -> None:
        super().__init__()
        self.mode = cfg.contraction
        self.n = cfg.streams
        if self.mode == "learned":
            self.static_weight = nn.Parameter(torch.ones(self.n))

    def reset_parameters(self) -> None:
        if self.mode == "learned":
            nn.init.ones_(self.static_weight)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(streams.dtype, torch.float32)  # bf16 streams sum in fp32
        if self.mode == "sum":
            return streams.sum(dim=-2, dtype=acc)
        if self.mode == "mean":
            return streams.mean(dim=-2, dtype=acc)
        w = self.static_weight.to(streams.dtype)
        return torch.einsum("...nc,n->...c", streams, w)
