"""Sinkhorn-Knopp projection onto the doubly stochastic matrices (mHC Eq 9).

The forward keeps nothing but its input; the backward re-runs the iterations and
back-propagates through them. Autograd through 20 unrolled iterations would keep 2 * t_max
intermediate [.., n, n] tensors per call; recomputing is cheap because n is tiny.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _iterate(logits: torch.Tensor, t_max: int) -> torch.Tensor:
    # Subtracting the per-matrix max is exact: a constant factor cancels in the first
    # column normalisation. It keeps exp() finite for large logits.
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(t_max):
        m = m / m.sum(dim=-2, keepdim=True)  # T_c: every column sums to 1
        m = m / m.sum(dim=-1, keepdim=True)  # T_r: every row sums to 1
    return m


class _SinkhornKnopp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, t_max: int) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.t_max = t_max
        return _iterate(logits, t_max)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (logits,) = ctx.saved_tensors
        with torch.enable_grad():
            x = logits.detach().requires_grad_(True)
            out = _iterate(x, ctx.t_max)
            (grad_in,) = torch.autograd.grad(out, x, grad_out)
        return grad_in, None


def sinkhorn_knopp_torch(logits: torch.Tensor, t_max: int, recompute_backward: bool = True) -> torch.Tensor:
    """Reference Sinkhorn-Knopp. ``recompute_backward=False`` differentiates the unrolled loop."""
    if recompute_backward and torch.is_grad_enabled() and logits.requires_grad:
        return _SinkhornKnopp.apply(logits, t_max)
    return _iterate(logits, t_max)
