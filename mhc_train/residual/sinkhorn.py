"""Sinkhorn-Knopp projection onto the doubly stochastic matrices (mHC Eq 9).

The forward keeps nothing but its input; the backward re-runs the iterations and
back-propagates through them by hand. Autograd through 20 unrolled iterations would keep
2 * t_max intermediate [.., n, n] tensors per call for the whole backward pass; here they live
only inside this op's backward.

The iterations run on a [n, n, tokens] layout: the n x n matrices are tiny, so with tokens
last every normalisation is a contiguous, vectorised pass (the [tokens, n, n] layout spends
most of its time in broadcasting over 4-element rows).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _to_token_last(logits: torch.Tensor) -> torch.Tensor:
    n = logits.shape[-1]
    return logits.reshape(-1, n, n).permute(1, 2, 0).contiguous()  # [n, n, T]


def _from_token_last(m: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return m.permute(2, 0, 1).reshape(shape)


def _exp_shifted(logits_nnt: torch.Tensor) -> torch.Tensor:
    # Subtracting the per-matrix max is exact: a constant factor cancels in the first
    # column normalisation. It keeps exp() finite for large logits.
    return torch.exp(logits_nnt - logits_nnt.amax(dim=(0, 1), keepdim=True))


def _iterate(logits_nnt: torch.Tensor, t_max: int, keep: list | None = None) -> torch.Tensor:
    """t_max x (columns, then rows). With ``keep``, record (normalised matrix, sums) per step."""
    m = _exp_shifted(logits_nnt)
    for _ in range(t_max):
        for dim in (0, 1):  # dim 0: sum over rows i = column sums (T_c); dim 1: row sums (T_r)
            s = m.sum(dim=dim, keepdim=True)
            m = m / s
            if keep is not None:
                keep.append((m, s, dim))
    return m


class _SinkhornKnopp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, t_max: int) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.t_max = t_max
        return sinkhorn_forward(logits, t_max)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (logits,) = ctx.saved_tensors
        return sinkhorn_backward(logits, grad_out, ctx.t_max), None


def sinkhorn_forward(logits: torch.Tensor, t_max: int) -> torch.Tensor:
    """Sinkhorn-Knopp without autograd (the forward of the custom functions)."""
    with torch.no_grad():
        return _from_token_last(_iterate(_to_token_last(logits), t_max), logits.shape).contiguous()


def sinkhorn_recompute(logits: torch.Tensor, t_max: int):
    """Re-run the iterations from the logits: (the forward's result, bitwise, as a contiguous
    ``[..., n, n]``; its vector-Jacobian product, d loss / d output -> d loss / d logits)."""
    steps: list = []
    logits_nnt = _to_token_last(logits)
    m = _iterate(logits_nnt, t_max, keep=steps)

    def vjp(grad_out: torch.Tensor) -> torch.Tensor:
        # Back-propagated with respect to the logarithms of the iterates, where a normalisation
        # m_new = m / sum_dim(m) is l_new = l - logsumexp_dim(l), whose gradient is
        # g - m_new * sum_dim(g): no division. The same gradient written for m itself,
        # (g - sum_dim(g * m_new)) / sum_dim(m), then times m0 = exp(l - max) at the end, divides
        # by sums that underflow for logits spread over ~90 or more and turned a finite forward
        # into inf * 0 = NaN gradients (an mHC run diverged at step 124 of docs/reproduction.md's
        # instability probe). The max shift carries no gradient.
        g = _to_token_last(grad_out) * m
        for m_new, _, dim in reversed(steps):
            g = g - m_new * g.sum(dim=dim, keepdim=True)
        return _from_token_last(g, logits.shape)

    return _from_token_last(m, logits.shape).contiguous(), vjp


def sinkhorn_backward(logits: torch.Tensor, grad_out: torch.Tensor, t_max: int) -> torch.Tensor:
    """d loss / d logits from d loss / d output, recomputing the iterations from the logits."""
    return sinkhorn_recompute(logits, t_max)[1](grad_out)


def _iterate_autograd(logits: torch.Tensor, t_max: int) -> torch.Tensor:
    """The same maths on [..., n, n] with plain autograd: the reference for the custom backward."""
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(t_max):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


def sinkhorn_knopp_torch(logits: torch.Tensor, t_max: int, recompute_backward: bool = True) -> torch.Tensor:
    """Reference Sinkhorn-Knopp. ``recompute_backward=False`` differentiates the unrolled loop."""
    if not recompute_backward:
        return _iterate_autograd(logits, t_max)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _SinkhornKnopp.apply(logits, t_max)
    return sinkhorn_forward(logits, t_max)
