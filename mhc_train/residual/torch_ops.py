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

from mhc_train.residual.sinkhorn import sinkhorn_backward, sinkhorn_forward


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
            grad_x = (g_proj @ at_least_fp32(phi).t()).addcmul_(coef, x32).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_phi = (x32.t() @ g_proj).to(phi.dtype)
        if ctx.needs_input_grad[2]:
            grad_gate = (g * proj * inv_r).sum(dim=0).to(gate.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = g.sum(dim=0).to(ctx.bias_dtype)
        return grad_x, grad_phi, grad_gate, grad_bias, None


class PreMappings(torch.autograd.Function):
    """The whole read of an mHC connection, Eq 14-19 then H_pre x, in one node.

    x [T, n, C], phi [nC, W], gate [W], bias [W] -> u [T, C] (x's dtype), h_pre, h_post [T, n],
    h_res [T, n, n] (fp32). One node instead of seven means one gradient for the streams
    (mapping and aggregation terms written into one buffer) instead of two that autograd adds,
    and no stream-sized temporaries for the RMS and outer-product terms.
    """

    @staticmethod
    def forward(ctx, x, phi, gate, bias, t_max: int, eps: float):
        t, n, c = x.shape
        x32 = at_least_fp32(x)
        flat = x32.reshape(t, n * c)
        proj = flat @ at_least_fp32(phi)
        inv_r = torch.rsqrt(torch.linalg.vector_norm(flat, dim=-1, keepdim=True).pow(2) / (n * c) + eps)
        logits = torch.addcmul(at_least_fp32(bias), inv_r * proj, at_least_fp32(gate))
        h_pre = torch.sigmoid(logits[:, :n])
        h_post = 2.0 * torch.sigmoid(logits[:, n : 2 * n])
        h_res = sinkhorn_forward(logits[:, 2 * n :].reshape(t, n, n), t_max)
        u = torch.bmm(h_pre.unsqueeze(1), x32).squeeze(1).to(x.dtype)
        ctx.save_for_backward(x, phi, gate, proj, inv_r, logits, h_pre, h_post)
        ctx.t_max, ctx.bias_dtype = t_max, bias.dtype
        return u, h_pre, h_post, h_res

    @staticmethod
    @once_differentiable
    def backward(ctx, g_u, g_pre, g_post, g_res):
        x, phi, gate, proj, inv_r, logits, h_pre, h_post = ctx.saved_tensors
        t, n, c = x.shape
        x32 = at_least_fp32(x)
        zeros = lambda shape: torch.zeros(shape, dtype=logits.dtype, device=logits.device)  # noqa: E731
        g_u = at_least_fp32(g_u) if g_u is not None else zeros((t, c))
        # d loss / d H_pre: from u = H_pre x, plus any direct use of h_pre.
        g_h_pre = torch.bmm(x32, g_u.unsqueeze(-1)).squeeze(-1)
        if g_pre is not None:
            g_h_pre = g_h_pre + g_pre
        d_pre = g_h_pre * h_pre * (1.0 - h_pre)  # sigmoid'
        d_post = (g_post * h_post * (1.0 - 0.5 * h_post)) if g_post is not None else zeros((t, n))  # (2 sigmoid)'
        d_res = (sinkhorn_backward(logits[:, 2 * n :].reshape(t, n, n), g_res, ctx.t_max).reshape(t, n * n)
                 if g_res is not None else zeros((t, n * n)))
        g_logits = torch.cat([d_pre, d_post, d_res], dim=-1)  # [T, W]
        gate32 = at_least_fp32(gate)
        g_proj = g_logits * gate32 * inv_r
        grad_x = grad_phi = grad_gate = grad_bias = None
        if ctx.needs_input_grad[0]:
            flat = x32.reshape(t, n * c)
            # d inv_r / d x = -inv_r^3 x / (nC), summed against g_logits * gate * proj.
            coef = -(g_logits * gate32 * proj).sum(dim=-1, keepdim=True) * inv_r.pow(3) / (n * c)
            grad_flat = g_proj @ at_least_fp32(phi).t()
            grad_flat.addcmul_(coef, flat)
            grad_flat.view(t, n, c).addcmul_(h_pre.unsqueeze(-1), g_u.unsqueeze(1))  # from u = H_pre x
            grad_x = grad_flat.view(t, n, c).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_phi = (x32.reshape(t, n * c).t() @ g_proj).to(phi.dtype)
        if ctx.needs_input_grad[2]:
            grad_gate = (g_logits * proj * inv_r).sum(dim=0).to(gate.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = g_logits.sum(dim=0).to(ctx.bias_dtype)
        return grad_x, grad_phi, grad_gate, grad_bias, None, None
