"""Creating the n streams from the embedding and collapsing them before the head."""

from __future__ import annotations

import torch
from torch import nn

from mhc_train.residual.config import ResidualConfig


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
        if self.mode == "sum":
            return streams.sum(dim=-2)
        if self.mode == "mean":
            return streams.mean(dim=-2)
        w = self.static_weight.to(streams.dtype)
        return torch.einsum("...nc,n->...c", streams, w)
