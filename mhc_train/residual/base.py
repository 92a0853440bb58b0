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
        # While recording, read() sums H_res over the tokens it sees (no grad), over as many
        # forwards as run (a pipeline stage sees one micro-batch per forward): recorded_h_res is
        # their token average, for the gain metrics. The token count is a tensor too: a compiled
        # block (train.compile) specialises on Python ints it reads, and would recompile for every
        # forward of one recording.
        self.record_mappings = False
        self._h_res_sum: torch.Tensor | None = None
        self._h_res_tokens: torch.Tensor | None = None

    def start_recording(self) -> None:
        self.record_mappings, self._h_res_sum, self._h_res_tokens = True, None, None

    def stop_recording(self) -> None:
        self.record_mappings, self._h_res_sum, self._h_res_tokens = False, None, None

    @property
    def recorded_h_res(self) -> torch.Tensor | None:
        return None if self._h_res_sum is None else self._h_res_sum / self._h_res_tokens

    def read(self, streams: torch.Tensor) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def write(self, streams: torch.Tensor, y: torch.Tensor, mix: Any) -> torch.Tensor:
        raise NotImplementedError

    def _record(self, h_res: torch.Tensor) -> None:
        if self.record_mappings:
            h = h_res.detach().float().reshape(-1, self.n, self.n)
            total, tokens = h.sum(dim=0), h.new_full((), h.shape[0], dtype=torch.int64)
            first = self._h_res_sum is None
            self._h_res_sum = total if first else self._h_res_sum + total
            self._h_res_tokens = tokens if first else self._h_res_tokens + tokens


class BaselineResidual(ResidualConnection):
    """The standard residual: one stream, ``x + F(x)``."""

    n = 1

    def read(self, streams: torch.Tensor) -> tuple[torch.Tensor, None]:
        self._record(streams.new_ones(1, 1, 1))
        return streams[..., 0, :], None

    def write(self, streams: torch.Tensor, y: torch.Tensor, mix: None) -> torch.Tensor:
        return (streams + y.unsqueeze(-2)).to(streams.dtype)  # the streams keep their dtype
