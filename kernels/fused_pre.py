"""Mappings and H_pre x in one kernel (beyond the paper's kernel plan): forward and backward.

References (the specification): ``mhc_train.residual.torch_ops.mhc_pre_mappings_forward`` /
``_backward`` (the same maths as ``mhc_mappings`` followed by ``apply_pre``);
``mhc_pre_mappings_forward`` / ``_backward`` here are the Triton implementation of
``torch.ops.mhc.mhc_pre_mappings``.

``fused_pre_mappings(x, phi, alpha, bias, t_max, eps) -> (u, h_pre, h_post, h_res)``: the same
with the kernels' own autograd.

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

Backward: two kernels, two passes over x. ``mappings._mhc_coef_bwd_kernel`` (with HAS_U) first
sums x . g_u over C into H_pre's gradient (pass 1: nC + C), then back-propagates the coefficients
(sigmoid, 2 sigmoid, Sinkhorn on chip) to g_proj and the RMS coefficient; then
``mappings._mhc_proj_bwd_kernel`` writes grad_x = g_proj phi^T + coef x + h_pre (x) g_u in the
same pass as grad_phi (pass 2: nC + C, writes nC), its phi slice in registers. x is read twice
because H_pre's gradient (a reduction over all of a token's nC) feeds every element of grad_x and
grad_phi, and a token block's nC cannot stay on chip (see the forward). Counted bytes:
``mhc-train-bench-ops --bytes``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .mappings import launch_mappings_bwd, launch_mappings_fwd, mapping_grads, mapping_operands, needs_grad


def mhc_pre_mappings_forward(x, phi, alpha, bias, t_max, eps):
    """(u [..., C] in x's dtype, h_pre, h_post, h_res, proj, inv_r): the contract of
    ``torch_ops.mhc_pre_mappings_forward``; equals ``apply_pre(x, h_pre)`` with the mappings."""
    n, c, t_max, eps, *operands = mapping_operands(x, phi, alpha, bias, t_max, eps)
    lead = x.shape[:-2]
    h_pre, h_post, h_res, proj, inv_r, u = launch_mappings_fwd(*operands, n, c, t_max, eps, True, u_dtype=x.dtype)
    return (u.reshape(*lead, c), h_pre.reshape(*lead, n), h_post.reshape(*lead, n), h_res.reshape(*lead, n, n),
            proj, inv_r.view(-1, 1))


def mhc_pre_mappings_backward(x, phi, alpha, bias, proj, inv_r, h_pre, h_post, g_u, g_pre, g_post, g_res, t_max,
                              needs):
    """(grad_x, grad_phi, grad_alpha, grad_bias), None where ``needs`` says no; ``g_*`` None:
    that output got no gradient."""
    n, c, t_max, _, x2, *params = mapping_operands(x, phi, alpha, bias, t_max, 0.0)
    t = x2.shape[0]
    h_pre = h_pre.reshape(t, n).contiguous()
    if g_u is not None:
        g_u = g_u.reshape(t, c).contiguous()
    grads = launch_mappings_bwd(x2, *params, proj, inv_r.reshape(-1), n, c, t_max, g_pre, g_post, g_res,
                                need_x=needs[0], need_phi=needs[1], h_pre=h_pre, g_u=g_u)
    return mapping_grads(x, phi, alpha, bias, grads, needs)


class FusedPreMappings(torch.autograd.Function):
    """Autograd of the kernels alone (``mhc_kernels.fused_pre_mappings``):
    (x, phi, alpha, bias) -> (u, h_pre, h_post, h_res)."""

    @staticmethod
    def forward(ctx, x, phi, alpha, bias, t_max, eps):
        u, h_pre, h_post, h_res, proj, inv_r = mhc_pre_mappings_forward(x, phi, alpha, bias, t_max, eps)
        ctx.save_for_backward(x, phi, alpha, bias, proj, inv_r, h_pre)
        ctx.t_max = t_max
        ctx.set_materialize_grads(False)
        return u, h_pre, h_post, h_res

    @staticmethod
    @once_differentiable
    def backward(ctx, g_u, g_pre, g_post, g_res):
        x, phi, alpha, bias, proj, inv_r, h_pre = ctx.saved_tensors
        grads = mhc_pre_mappings_backward(x, phi, alpha, bias, proj, inv_r, h_pre, None, g_u, g_pre, g_post, g_res,
                                          ctx.t_max, ctx.needs_input_grad[:4])
        return (*grads, None, None)


def fused_pre_mappings(x, phi, alpha, bias, t_max, eps=0.0):
    """(u [..., C] in x's dtype, h_pre [..., n], h_post [..., n], h_res [..., n, n] fp32).

    Equals ``apply_pre(x, h_pre)`` with ``(h_pre, h_post, h_res) = mhc_mappings(...)``.
    """
    if needs_grad(x, phi, alpha, bias):
        return FusedPreMappings.apply(x, phi, alpha, bias, t_max, eps)
    return mhc_pre_mappings_forward(x, phi, alpha, bias, t_max, eps)[:4]
