"""Mappings and H_pre x in one kernel (beyond the paper's kernel plan): forward and backward.

References (the specification): ``mhc_train.residual.ops.mhc_mappings`` followed by
``mhc_train.residual.ops.apply_pre`` (torch backend), i.e. ``torch_ops.MappingLogits``,
``sinkhorn.sinkhorn_knopp_torch`` and ``torch_ops.ApplyPre``.

``fused_pre_mappings(x, phi, alpha, bias, t_max, eps) -> (u, h_pre, h_post, h_res)``.

Forward: ``mappings._mhc_fwd_kernel`` with ``COMPUTE_U``. A program owns 16 tokens: pass 1 scans
their x rows (BLOCK_K at a time) for x.phi and the sum of squares, then the coefficients and
Sinkhorn run in registers, then pass 2 re-reads the same x rows (BLOCK_C features of all n
streams at a time) for u = H_pre x. H_pre needs the whole of x.phi, so u cannot be formed during
pass 1; and tl.dot needs >= 16 tokens per program, whose nC values (16 x 10240 at n = 4,
C = 2560, 320 KiB in bf16) exceed a GPU's registers and shared memory, so x cannot stay on chip
between the passes. Pass 2 is meant to hit L2: the in-flight working set is about
(programs in flight) x 16 nC elements, ~42 MB for 132 programs at n = 4, C = 2560 in bf16,
close to an H100's 50 MB L2, so at that size part of pass 2 may come from HBM again
(unmeasured: no GPU was available). Per token: reads nC from HBM (+ the re-read), writes
C + 2n + n^2 (+ W + 1 saved for the backward). The unfused path reads x twice from HBM
(mappings, then apply_pre) in two launches.

Backward: reuses the other kernels. ``apply._apply_pre_bwd_kernel`` (grad_h only) adds
sum_c x g_u to g_pre; ``mappings._mhc_coef_bwd_kernel`` back-propagates the coefficients;
``mappings._mhc_proj_bwd_kernel`` writes grad_x = g_proj phi^T + coef x + h_pre (x) g_u in the
same pass as grad_phi. x is read twice (nC each), grad_x written once.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._common import num_tokens
from .apply import apply_pre_backward
from .mappings import check_mapping_inputs, mappings_backward, mappings_forward, needs_grad


class FusedPreMappings(torch.autograd.Function):
    """(x [T, n, C], phi, alpha, bias) -> (u [T, C], h_pre, h_post, h_res)."""

    @staticmethod
    def forward(ctx, x2, phi, alpha, bias, t_max, eps):
        n, c = x2.shape[-2:]
        h_pre, h_post, h_res, proj, inv_r, u = mappings_forward(
            x2, phi, alpha, bias, n, c, t_max, eps, True, u_dtype=x2.dtype)
        ctx.save_for_backward(x2, phi, alpha, bias, proj, inv_r, h_pre)
        ctx.t_max = t_max
        ctx.set_materialize_grads(False)
        return u, h_pre, h_post, h_res

    @staticmethod
    @once_differentiable
    def backward(ctx, g_u, g_pre, g_post, g_res):
        x2, phi, alpha, bias, proj, inv_r, h_pre = ctx.saved_tensors
        n, c = x2.shape[-2:]
        need = ctx.needs_input_grad
        if g_u is not None:
            g_u = g_u.contiguous()
            _, gh = apply_pre_backward(x2, h_pre, g_u, need_x=False, need_h=True)
            g_pre = gh if g_pre is None else g_pre.float() + gh
        grad_x, grad_phi, grad_alpha, grad_bias = mappings_backward(
            x2, phi, alpha, bias, proj, inv_r, n, c, ctx.t_max, g_pre, g_post, g_res,
            need_x=need[0], need_phi=need[1], h_pre=h_pre, g_u=g_u,
        )
        return (
            grad_x,
            grad_phi.to(phi.dtype) if grad_phi is not None else None,
            grad_alpha.to(alpha.dtype) if need[2] else None,
            grad_bias.to(bias.dtype) if need[3] else None,
            None,
            None,
        )


def fused_pre_mappings(x, phi, alpha, bias, t_max, eps=0.0):
    """(u [..., C] in x's dtype, h_pre [..., n], h_post [..., n], h_res [..., n, n] fp32).

    Equals ``apply_pre(x, h_pre)`` with ``(h_pre, h_post, h_res) = mhc_mappings(...)``.
    """
    n, c, t_max, eps = check_mapping_inputs(x, phi, alpha, bias, t_max, eps)
    lead = x.shape[:-2]
    x2 = x.reshape(num_tokens(lead), n, c).contiguous()
    args = (x2, phi.contiguous(), alpha.contiguous(), bias.contiguous(), t_max, eps)
    if needs_grad(x, phi, alpha, bias):
        u, h_pre, h_post, h_res = FusedPreMappings.apply(*args)
    else:
        h_pre, h_post, h_res, _, _, u = mappings_forward(*args[:4], n, c, t_max, eps, False, u_dtype=x.dtype)
    return u.reshape(*lead, c), h_pre.reshape(*lead, n), h_post.reshape(*lead, n), h_res.reshape(*lead, n, n)
