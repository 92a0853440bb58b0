"""Sinkhorn-Knopp in Triton (mHC Eq 9): forward and recomputing backward.

Reference (the specification): ``mhc_train.residual.sinkhorn.sinkhorn_knopp_torch`` (custom
autograd ``_SinkhornKnopp``), dispatched by ``mhc_train.residual.ops.sinkhorn_knopp``.

One program holds ``BLOCK_T`` tokens' n x n matrices in registers as a ``[BLOCK_T, NP, NP]``
tile (NP = next power of two >= n, padded lanes masked). Forward: M0 = exp(l - max), then
t_max x (columns to sum 1, then rows to sum 1). Per token it reads n^2 and writes n^2 elements.

Backward: nothing per iteration is stored, neither in global memory nor in registers. For each
iteration p = t_max-1 .. 0 the program re-runs the forward from M0 up to p (runtime loops, so the
code size does not grow with t_max), then back-propagates the row and the column normalisation
of iteration p in the logarithms of the iterates: for l_new = l - logsumexp_dim(l) the gradient
is g - m_new * sum_dim(g), starting from g * output (no division by sums that can underflow).
Cost: t_max (t_max + 1) normalisations against the forward's 2 t_max (t_max = 20: 420 vs 40,
about 10x the forward's arithmetic, O(t_max^2)); memory traffic per token stays 3 n^2 elements
(logits and grad read, grad written), so for n <= 8 it remains a small, register-only kernel.
Storing per-iteration sums would need dynamically indexed register arrays, which Triton lacks.

The helpers ``sk_exp``, ``sk_forward`` and ``sk_backward`` are shared with the mappings kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._common import check_devices, check_t_max, check_tensor, MAX_STREAMS, next_pow2, num_tokens


@triton.jit
def _safe_sums(s, ok):
    # Padded rows/columns and padded tokens sum to 0: divide them by 1 instead (they stay 0).
    return tl.where(ok, s, 1.0)


@triton.jit
def sk_exp(logits, valid):
    """M0 = exp(l - max) per token over the valid n x n entries; padded entries are 0.

    The max shift is exact (a constant factor cancels in the first column normalisation) and
    keeps exp finite; it carries no gradient.
    """
    masked = tl.where(valid, logits, float("-inf"))
    mx = tl.max(tl.max(masked, axis=2), axis=1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # fully padded tokens
    return tl.where(valid, tl.exp(logits - mx[:, None, None]), 0.0)


@triton.jit
def sk_step(m, ok):
    """One Sinkhorn iteration: columns to sum 1 (sum over rows, axis 1), then rows (axis 2)."""
    m = m / _safe_sums(tl.sum(m, axis=1), ok)[:, None, :]
    m = m / _safe_sums(tl.sum(m, axis=2), ok)[:, :, None]
    return m


@triton.jit
def sk_forward(m0, ok, t_max):
    m = m0
    for _ in range(t_max):
        m = sk_step(m, ok)
    return m


@triton.jit
def sk_backward(m0, g, ok, t_max):
    """Gradient wrt the logits, from M0 = sk_exp(logits) and g = dL/d(output).

    ``ok`` [BLOCK_T, NP] marks the valid (token, row/column index) pairs.
    """
    # In the logarithms of the iterates (as the reference, mhc_train/residual/sinkhorn.py): a
    # normalisation's gradient is g - m_new * sum(g), with no division by sums that underflow.
    g = g * sk_forward(m0, ok, t_max)
    for p in range(t_max):
        m = m0
        for _ in range(t_max - 1 - p):  # recompute the input of iteration t_max-1-p
            m = sk_step(m, ok)
        m_col = m / _safe_sums(tl.sum(m, axis=1), ok)[:, None, :]
        m_row = m_col / _safe_sums(tl.sum(m_col, axis=2), ok)[:, :, None]
        g = g - m_row * tl.sum(g, axis=2)[:, :, None]
        g = g - m_col * tl.sum(g, axis=1)[:, None, :]
    return g


@triton.jit
def _sinkhorn_fwd_kernel(l_ptr, out_ptr, T, t_max,
                         N: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    idx = tl.arange(0, NP)
    ok = (rows < T)[:, None] & (idx < N)[None, :]
    valid = ok[:, :, None] & (idx < N)[None, None, :]
    offs = rows.to(tl.int64)[:, None, None] * (N * N) + idx[None, :, None] * N + idx[None, None, :]
    logits = tl.load(l_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    m = sk_forward(sk_exp(logits, valid), ok, t_max)
    tl.store(out_ptr + offs, m, mask=valid)


@triton.jit
def _sinkhorn_bwd_kernel(l_ptr, g_ptr, gl_ptr, T, t_max,
                         N: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    idx = tl.arange(0, NP)
    ok = (rows < T)[:, None] & (idx < N)[None, :]
    valid = ok[:, :, None] & (idx < N)[None, None, :]
    offs = rows.to(tl.int64)[:, None, None] * (N * N) + idx[None, :, None] * N + idx[None, None, :]
    logits = tl.load(l_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    grad = sk_backward(sk_exp(logits, valid), g, ok, t_max)
    tl.store(gl_ptr + offs, grad.to(gl_ptr.dtype.element_ty), mask=valid)


def token_block(n: int, t: int, elements: int = 1024) -> int:
    """Tokens per program for the register-resident n x n kernels (a power of two)."""
    npad = next_pow2(n)
    return max(1, min(next_pow2(t), elements // (npad * npad)))


def _launch(kernel, t: int, n: int, *args) -> None:
    if t == 0:
        return
    block_t = token_block(n, t)
    kernel[(triton.cdiv(t, block_t),)](*args, N=n, NP=next_pow2(n), BLOCK_T=block_t)


def launch_sinkhorn_fwd(logits: torch.Tensor, t_max: int) -> torch.Tensor:
    """Raw kernel call: contiguous [T, n, n] logits -> fp32 [T, n, n]."""
    t, n = logits.shape[0], logits.shape[-1]
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    _launch(_sinkhorn_fwd_kernel, t, n, logits, out, t, t_max)
    return out


def launch_sinkhorn_bwd(logits: torch.Tensor, grad_out: torch.Tensor, t_max: int) -> torch.Tensor:
    """Raw kernel call: gradient wrt contiguous [T, n, n] logits, in the logits' dtype."""
    t, n = logits.shape[0], logits.shape[-1]
    grad = torch.empty_like(logits)
    _launch(_sinkhorn_bwd_kernel, t, n, logits, grad_out.contiguous(), grad, t, t_max)
    return grad


def _flat_logits(logits: torch.Tensor, t_max) -> tuple[torch.Tensor, int]:
    """Checked ``[..., n, n]`` logits as a contiguous [T, n, n], and t_max."""
    check_tensor("logits", logits)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits must have shape [..., n, n], got {tuple(logits.shape)}")
    n = logits.shape[-1]
    if not 1 <= n <= MAX_STREAMS:
        raise ValueError(f"the Triton kernels support 1 <= n <= {MAX_STREAMS}, got n = {n}")
    t_max = check_t_max(t_max)
    check_devices(_sinkhorn_fwd_kernel, logits=logits)
    return logits.reshape(num_tokens(logits.shape[:-2]), n, n).contiguous(), t_max


def sinkhorn_knopp_forward(logits: torch.Tensor, t_max: int) -> torch.Tensor:
    """``[..., n, n]`` logits (fp32/bf16/fp16) -> doubly stochastic ``[..., n, n]`` fp32."""
    flat, t_max = _flat_logits(logits, t_max)
    return launch_sinkhorn_fwd(flat, t_max).reshape(logits.shape)


def sinkhorn_knopp_backward(logits: torch.Tensor, grad: torch.Tensor, t_max: int) -> torch.Tensor:
    """d loss / d logits, ``[..., n, n]`` in the logits' dtype."""
    flat, t_max = _flat_logits(logits, t_max)
    return launch_sinkhorn_bwd(flat, grad.reshape(flat.shape), t_max).reshape(logits.shape)


class SinkhornKnopp(torch.autograd.Function):
    """Autograd of the kernels alone (``mhc_kernels.sinkhorn_knopp``); saves only the logits."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, t_max: int) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.t_max = t_max
        return sinkhorn_knopp_forward(logits, t_max)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (logits,) = ctx.saved_tensors
        return sinkhorn_knopp_backward(logits, grad_out, ctx.t_max), None


def sinkhorn_knopp(logits: torch.Tensor, t_max: int) -> torch.Tensor:
    """``[..., n, n]`` logits (fp32/bf16/fp16) -> doubly stochastic ``[..., n, n]`` fp32."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return SinkhornKnopp.apply(logits, t_max)
    return sinkhorn_knopp_forward(logits, t_max)
