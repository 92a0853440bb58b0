"""RMSNorm, shared by the model and the HC connections (it sits below both)."""

from __future__ import annotations

import torch
from torch import nn

from mhc_train.weight_casts import cast_weight


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)`` over the last dim; the statistics in fp32.

    The output has the input's dtype, and the weight is rounded to it first: a bf16 input gives
    a bf16 output (the sublayer's input, which attention and the experts save for backward) in
    every layout, the same values whether the weight is an fp32 parameter (one process, DDP,
    the pipeline) or FSDP's bf16 gather of it. An fp32 input is untouched by the rounding.
    The paper's Table 5 uses eps = 1e-20, i.e. effectively none.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return cast_weight(self.weight, x.dtype) * x32.to(x.dtype)  # once per step (weight_casts)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
