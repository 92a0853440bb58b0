"""Torch implementations of the mHC ops with hand-written backwards.

Plain autograd of the stream ops makes several passes over the [..., n, C] streams per op
(broadcast products, their backwards, the sum of partial gradients); these functions do the
fewest: batched matmuls on contiguous operands, and for the mappings one matmul plus one
fused update for the RMS term. They are checked against the plain formulas by gradcheck
(tests/test_ops.py). The Triton kernels of mhc_kernels implement the same contracts.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _flat(x: torch.Tensor, n: int, c: int) -> torch.Tensor:
    return x.reshape(-1, n, c)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """The maths dtype: fp32 for bf16/fp16/fp32 inputs, fp64 kept (gradcheck runs in fp64)."""
    return t if t.dtype == torch.float64 else t.float()


class ApplyPre(torch.autograd.Function):
    """u[t] = sum_i h[t, i] x[t, i]  (x [T, n, C], h [T, n], fp32 maths)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[-2:]
        x3 = at_least_fp32(_flat(x, n, c))
        h3 = at_least_fp32(h.reshape(-1, 1, n))
        ctx.save_for_backward(x, h)
        return torch.bmm(h3, x3).reshape(*x.shape[:-2], c).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, h = ctx.saved_tensors
        n, c = x.shape[-2:]
        g3 = at_least_fp32(g.reshape(-1, 1, c))
        grad_x = grad_h = None
        if ctx.needs_input_grad[0]:
            grad_x = (at_least_fp32(h.reshape(-1, n, 1)) * g3).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_h = torch.bmm(at_least_fp32(_flat(x, n, c)), g3.transpose(1, 2)).reshape(h.shape).to(h.dtype)
        return grad_x, grad_h


class ApplyPostRes(torch.autograd.Function):
    """out[t] = h_res[t] @ x[t] + h_post[t]^T y[t].

    Outer products are broadcast multiplies, not K=1 batched matmuls: on CPU those (and
    baddbmm) fall back to one small matmul per token and run 10x slower.
    """

    @staticmethod
    def forward(ctx, x, y, h_post, h_res):
        n, c = x.shape[-2:]
        x3 = at_least_fp32(_flat(x, n, c))
        out = torch.bmm(at_least_fp32(h_res.reshape(-1, n, n)), x3)
        out.addcmul_(at_least_fp32(h_post.reshape(-1, n, 1)), at_least_fp32(y.reshape(-1, 1, c)))
        ctx.save_for_backward(x, y, h_post, h_res)
        return out.reshape(x.shape).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, y, h_post, h_res = ctx.saved_tensors
        n, c = x.shape[-2:]
        g3 = at_least_fp32(_flat(g, n, c))
        grad_x = grad_y = grad_post = grad_res = None
        if ctx.needs_input_grad[0]:
            h_res_t = at_least_fp32(h_res.reshape(-1, n, n)).transpose(1, 2)
            grad_x = torch.bmm(h_res_t, g3).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_y = torch.bmm(at_least_fp32(h_post.reshape(-1, 1, n)), g3).reshape(y.shape).to(y.dtype)
        if ctx.needs_input_grad[2]:
            grad_post = torch.bmm(g3, at_least_fp32(y.reshape(-1, c, 1))).reshape(h_post.shape).to(h_post.dtype)
        if ctx.needs_input_grad[3]:
            x_t = at_least_fp32(_flat(x, n, c)).transpose(1, 2)
            grad_res = torch.bmm(g3, x_t).reshape(h_res.shape).to(h_res.dtype)
        return grad_x, grad_y, grad_post, grad_res


class MappingLogits(torch.autograd.Function):
    """H~ = (1/r) * gate * (x phi) + bias, r = sqrt(mean(x^2) + eps) over the nC vector (Eq 14-16).

    x [T, nC] (any float dtype, maths in fp32), phi [nC, W], gate [W] (alpha spread over the
    pre | post | res columns), bias [W] -> logits [T, W] fp32. Saves x, phi and two [T, W] /
    [T, 1] fp32 tensors; the backward is one matmul for x plus one fused RMS correction.
    """

    @staticmethod
    def forward(ctx, x, phi, gate, bias, eps: float):
        x32 = at_least_fp32(x)
        proj = x32 @ at_least_fp32(phi)  # [T, W]
        inv_r = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)  # [T, 1]
        logits = torch.addcmul(at_least_fp32(bias), inv_r * proj, at_least_fp32(gate))
        ctx.save_for_backward(x, phi, gate, proj, inv_r)
        ctx.bias_dtype = bias.dtype
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, phi, gate, proj, inv_r = ctx.saved_tensors
        x32 = at_least_fp32(x)
        gate32 = at_least_fp32(gate)
        g = at_least_fp32(g)
        g_proj = g * gate32 * inv_r  # d logits / d proj
        grad_x = grad_phi = grad_gate = grad_bias = None
        if ctx.needs_input_grad[0]:
            # d inv_r / d x = -inv_r^3 x / D; summed against g * gate * proj.
            d = x32.shape[-1]
            coef = -(g * gate32 * proj).sum(dim=-1, keepdim=True) * inv_r.pow(3) / d
            grad_x = torch.addmm(coef * x32, g_proj, at_least_fp32(phi).t()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_phi = (x32.t() @ g_proj).to(phi.dtype)
        if ctx.needs_input_grad[2]:
            grad_gate = (g * proj * inv_r).sum(dim=0).to(gate.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = g.sum(dim=0).to(ctx.bias_dtype)
        return grad_x, grad_phi, grad_gate, grad_bias, None
