"""The one interface of all residual connections.

A block wraps each sublayer F (attention, FFN) in its own connection:

    u, mix  = conn.read(streams)           # u = H_pre . streams            [..., C]
    y       = F(norm(u))                   # F never sees the streams
    streams = conn.write(streams, y, mix)  # H_res . streams + H_post^T y   [..., n, C]

Streams are ``[B, S, n, C]`` everywhere between embedding and head (n = 1 for the baseline).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ResidualConnection(nn.Module):
    """Base class: ``read`` aggregates the streams, ``write`` merges a sublayer output back."""

    n: int = 1

    def __init__(self) -> None:
        super().__init__()
        # When set, read() keeps the token-averaged H_res for the gain metrics (no grad).
        self.record_mappings = False
        self.recorded_h_res: torch.Tensor | None = None

    def read(self, streams: torch.Tensor) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def write(self, streams: torch.Tensor, y: torch.Tensor, mix: Any) -> torch.Tensor:
        raise NotImplementedError

    def _record(self, h_res: torch.Tensor) -> None:
        if self.record_mappings:
            self.recorded_h_res = h_res.detach().float().reshape(-1, self.n, self.n).mean(dim=0)


class BaselineResidual(ResidualConnection):
    """The standard residual: one stream, ``x + F(x)``."""

    n = 1

    def read(self, streams: torch.Tensor) -> tuple[torch.Tensor, None]:
        self._record(streams.new_ones(1, 1, 1))
        return streams[..., 0, :], None

    def write(self, streams: torch.Tensor, y: torch.Tensor, mix: None) -> torch.Tensor:
        return streams + y.unsqueeze(-2)
