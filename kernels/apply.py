"""Applying the mHC mappings in Triton: H_pre x and H_res x + H_post^T y, forward and backward.

References (the specification): ``apply_pre_forward`` / ``_backward`` and
``apply_post_res_forward`` / ``_backward`` of ``mhc_train.residual.torch_ops``, the same-named
functions here being the Triton implementation of ``torch.ops.mhc.apply_pre`` and
``torch.ops.mhc.apply_post_res`` (called by ``mhc_train.residual.ops``).

All maths in fp32 (inputs upcast right after ``tl.load``), outputs in x's dtype; coefficient
gradients in the coefficients' dtype. Every kernel runs one program per BLOCK_T tokens (autotuned
with BLOCK_C, see ``_apply_configs``): it loads its tokens' coefficients once, then walks their
whole C in [BLOCK_T, BLOCK_C] tiles per stream, so no coefficient is re-read per C block and
the coefficient gradients are reduced in registers. Per token, in elements:

* ``_apply_pre_fwd_kernel``: u = sum_i h[i] x[i]. Reads nC + n, writes C.
* ``_apply_pre_bwd_kernel``: grad_x = h (x) g, grad_h = sum_c x g. Reads nC + C + n,
  writes nC + n.
* ``_apply_post_res_fwd_kernel``: out = h_res x + h_post^T y. Reads (n+1)C + n^2 + n, writes nC
  (the fused post/res kernel of the paper, Table 2's (3n+1)C reads cut to (n+1)C).
* ``_apply_post_res_bwd_kernel``: grad_x = h_res^T g, grad_y = h_post . g,
  grad_h_post = sum_c g y, grad_h_res = g x^T, one pass over C per token.
  Reads (2n+1)C + n^2 + n, writes (n+1)C + n^2 + n.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._common import check_devices, check_shape, check_streams, check_tensor, interpreting, next_pow2, num_tokens, quick_autotune


def _apply_configs():
    """Autotune configs of the four apply kernels, chosen at import time.

    A program owns BLOCK_T tokens: their coefficients (h_pre / h_post [BLOCK_T, n], h_res
    [BLOCK_T, n, n]) are loaded once, then it walks C in [BLOCK_T, BLOCK_C] tiles per stream
    (grid = token blocks only, so no coefficient is re-read per C block). On a GPU (Hopper in
    mind: memory-bound, 16-byte vector loads want >= 8 bf16 a thread, and the post-res tiles
    are n x BLOCK_T x BLOCK_C fp32 in registers): BLOCK_T 1-16 x BLOCK_C 128-1024 with
    512 <= BLOCK_T * BLOCK_C <= 4096 elements a stream, at 4 or 8 warps. Under TRITON_INTERPRET=1
    a single config: the interpreter cannot run a multi-config autotune (it benchmarks with the
    GPU timer), and one config skips the benchmark; it is a multi-token one (BLOCK_T = 4,
    BLOCK_C = 32) so the CPU tests run partial token and C blocks. ``_prune`` drops, per n, the
    tiles whose [BLOCK_T, NP, BLOCK_C] fp32 post-res tile would exceed ``MAX_TILE`` elements.
    Untuned on hardware: no GPU was available when these were chosen.
    """
    if interpreting():
        return [triton.Config({"BLOCK_T": 4, "BLOCK_C": 32}, num_warps=4)]
    if quick_autotune():  # two mid-sized tiles of 2048 elements a stream
        return [triton.Config({"BLOCK_T": 4, "BLOCK_C": 512}, num_warps=4),
                triton.Config({"BLOCK_T": 8, "BLOCK_C": 256}, num_warps=8)]
    return [triton.Config({"BLOCK_T": bt, "BLOCK_C": bc}, num_warps=w)
            for bt in (1, 4, 8, 16) for bc in (128, 256, 512, 1024) for w in (4, 8)
            if 512 <= bt * bc <= 4096]


MAX_TILE = 8192  # fp32 elements of a [BLOCK_T, NP, BLOCK_C] tile: 64 registers a thread at 4 warps


def _prune(configs, named_args, **kwargs):
    """The configs whose n-stream tile fits ``MAX_TILE`` (at least the smallest one)."""
    def size(c):
        return kwargs["NP"] * c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_C"]
    fit = [c for c in configs if size(c) <= MAX_TILE]
    return fit or [min(configs, key=size)]


_PRUNE = {"early_config_prune": _prune}


@triton.jit
def _column(tile, idx, i):
    """tile[:, i] of a [BLOCK_T, NP] tile (a one-hot select: exact)."""
    return tl.sum(tl.where((idx == i)[None, :], tile, 0.0), axis=1)


@triton.autotune(configs=_apply_configs(), prune_configs_by=_PRUNE, key=["C", "N"])
@triton.jit
def _apply_pre_fwd_kernel(x_ptr, h_ptr, u_ptr, T, C,
                          N: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok = rows < T
    rows64 = rows.to(tl.int64)
    idx = tl.arange(0, NP)
    ok = tok[:, None] & (idx < N)[None, :]
    h = tl.load(h_ptr + rows64[:, None] * N + idx[None, :], mask=ok, other=0.0).to(tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        mask2 = tok[:, None] & (cs < C)[None, :]
        u = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(N):  # u += h[i] x[i], one [BLOCK_T, BLOCK_C] tile a stream
            x_i = tl.load(x_ptr + rows64[:, None] * (N * C) + i * C + cs[None, :], mask=mask2,
                          other=0.0).to(tl.float32)
            u += _column(h, idx, i)[:, None] * x_i
        tl.store(u_ptr + rows64[:, None] * C + cs[None, :], u.to(u_ptr.dtype.element_ty), mask=mask2)


@triton.autotune(configs=_apply_configs(), prune_configs_by=_PRUNE, key=["C", "N", "NEED_X", "NEED_H"])
@triton.jit
def _apply_pre_bwd_kernel(x_ptr, h_ptr, g_ptr, gx_ptr, gh_ptr, T, C,
                          N: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                          NEED_X: tl.constexpr, NEED_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok = rows < T
    rows64 = rows.to(tl.int64)
    idx = tl.arange(0, NP)
    ok = tok[:, None] & (idx < N)[None, :]
    h = tl.zeros([BLOCK_T, NP], dtype=tl.float32)
    if NEED_X:
        h = tl.load(h_ptr + rows64[:, None] * N + idx[None, :], mask=ok, other=0.0).to(tl.float32)
    acc_h = tl.zeros([BLOCK_T, NP], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        mask2 = tok[:, None] & (cs < C)[None, :]
        g = tl.load(g_ptr + rows64[:, None] * C + cs[None, :], mask=mask2, other=0.0).to(tl.float32)
        for i in tl.static_range(N):
            offs = rows64[:, None] * (N * C) + i * C + cs[None, :]
            if NEED_X:  # grad_x[i] = h[i] g
                tl.store(gx_ptr + offs, (_column(h, idx, i)[:, None] * g).to(gx_ptr.dtype.element_ty), mask=mask2)
            if NEED_H:  # grad_h[i] = sum_c x[i] g
                x_i = tl.load(x_ptr + offs, mask=mask2, other=0.0).to(tl.float32)
                acc_h += tl.where((idx == i)[None, :], tl.sum(x_i * g, axis=1)[:, None], 0.0)
    if NEED_H:
        tl.store(gh_ptr + rows64[:, None] * N + idx[None, :], acc_h.to(gh_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=_apply_configs(), prune_configs_by=_PRUNE, key=["C", "N"])
@triton.jit
def _apply_post_res_fwd_kernel(x_ptr, y_ptr, hp_ptr, hr_ptr, out_ptr, T, C,
                               N: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok = rows < T
    rows64 = rows.to(tl.int64)
    idx = tl.arange(0, NP)
    ok = tok[:, None] & (idx < N)[None, :]
    valid = ok[:, :, None] & (idx < N)[None, None, :]
    hp = tl.load(hp_ptr + rows64[:, None] * N + idx[None, :], mask=ok, other=0.0).to(tl.float32)
    hr = tl.load(hr_ptr + rows64[:, None, None] * (N * N) + idx[None, :, None] * N + idx[None, None, :],
                 mask=valid, other=0.0).to(tl.float32)  # [BLOCK_T, i, j]
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        mask2 = tok[:, None] & c_ok[None, :]
        y = tl.load(y_ptr + rows64[:, None] * C + cs[None, :], mask=mask2, other=0.0).to(tl.float32)
        out = hp[:, :, None] * y[:, None, :]  # [BLOCK_T, i, BLOCK_C]
        for j in tl.static_range(N):  # out[i] += h_res[i, j] x[j]
            hr_j = tl.sum(tl.where((idx == j)[None, None, :], hr, 0.0), axis=2)  # h_res[:, :, j]
            x_j = tl.load(x_ptr + rows64[:, None] * (N * C) + j * C + cs[None, :], mask=mask2,
                          other=0.0).to(tl.float32)
            out += hr_j[:, :, None] * x_j[:, None, :]
        tl.store(out_ptr + rows64[:, None, None] * (N * C) + idx[None, :, None] * C + cs[None, None, :],
                 out.to(out_ptr.dtype.element_ty), mask=ok[:, :, None] & c_ok[None, None, :])


@triton.autotune(configs=_apply_configs(), prune_configs_by=_PRUNE,
                 key=["C", "N", "NEED_X", "NEED_Y", "NEED_HP", "NEED_HR"])
@triton.jit
def _apply_post_res_bwd_kernel(x_ptr, y_ptr, hp_ptr, hr_ptr, g_ptr, gx_ptr, gy_ptr, ghp_ptr, ghr_ptr, T, C,
                               N: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                               NEED_X: tl.constexpr, NEED_Y: tl.constexpr, NEED_HP: tl.constexpr,
                               NEED_HR: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok = rows < T
    rows64 = rows.to(tl.int64)
    idx = tl.arange(0, NP)
    ok = tok[:, None] & (idx < N)[None, :]
    valid = ok[:, :, None] & (idx < N)[None, None, :]
    hp = tl.zeros([BLOCK_T, NP], dtype=tl.float32)
    hr = tl.zeros([BLOCK_T, NP, NP], dtype=tl.float32)
    if NEED_Y:
        hp = tl.load(hp_ptr + rows64[:, None] * N + idx[None, :], mask=ok, other=0.0).to(tl.float32)
    if NEED_X:
        hr = tl.load(hr_ptr + rows64[:, None, None] * (N * N) + idx[None, :, None] * N + idx[None, None, :],
                     mask=valid, other=0.0).to(tl.float32)  # [BLOCK_T, i, j]
    acc_hp = tl.zeros([BLOCK_T, NP], dtype=tl.float32)
    acc_hr = tl.zeros([BLOCK_T, NP, NP], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        mask2 = tok[:, None] & c_ok[None, :]
        mask3 = ok[:, :, None] & c_ok[None, None, :]
        offs3 = rows64[:, None, None] * (N * C) + idx[None, :, None] * C + cs[None, None, :]
        gx = tl.zeros([BLOCK_T, NP, BLOCK_C], dtype=tl.float32)
        gy = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        y = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        x = tl.zeros([BLOCK_T, NP, BLOCK_C], dtype=tl.float32)
        if NEED_HP:
            y = tl.load(y_ptr + rows64[:, None] * C + cs[None, :], mask=mask2, other=0.0).to(tl.float32)
        if NEED_HR:
            x = tl.load(x_ptr + offs3, mask=mask3, other=0.0).to(tl.float32)  # [BLOCK_T, j, BLOCK_C]
        for i in tl.static_range(N):
            g_i = tl.load(g_ptr + rows64[:, None] * (N * C) + i * C + cs[None, :], mask=mask2,
                          other=0.0).to(tl.float32)
            if NEED_X:  # grad_x[j] += h_res[i, j] g[i]
                hr_i = tl.sum(tl.where((idx == i)[None, :, None], hr, 0.0), axis=1)  # h_res[:, i, :]
                gx += hr_i[:, :, None] * g_i[:, None, :]
            if NEED_Y:  # grad_y += h_post[i] g[i]
                gy += _column(hp, idx, i)[:, None] * g_i
            if NEED_HP:  # grad_h_post[i] += sum_c g[i] y
                acc_hp += tl.where((idx == i)[None, :], tl.sum(g_i * y, axis=1)[:, None], 0.0)
            if NEED_HR:  # grad_h_res[i, j] += sum_c g[i] x[j]
                acc_hr += tl.where((idx == i)[None, :, None], tl.sum(g_i[:, None, :] * x, axis=2)[:, None, :], 0.0)
        if NEED_X:
            tl.store(gx_ptr + offs3, gx.to(gx_ptr.dtype.element_ty), mask=mask3)
        if NEED_Y:
            tl.store(gy_ptr + rows64[:, None] * C + cs[None, :], gy.to(gy_ptr.dtype.element_ty), mask=mask2)
    if NEED_HP:
        tl.store(ghp_ptr + rows64[:, None] * N + idx[None, :], acc_hp.to(ghp_ptr.dtype.element_ty), mask=ok)
    if NEED_HR:
        tl.store(ghr_ptr + rows64[:, None, None] * (N * N) + idx[None, :, None] * N + idx[None, None, :],
                 acc_hr.to(ghr_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------------------------
# Launchers (grid: one program per BLOCK_T tokens, BLOCK_T / BLOCK_C from the autotuner)
# --------------------------------------------------------------------------------------------


def _grid(t: int):
    return lambda meta: (triton.cdiv(t, meta["BLOCK_T"]),)


def launch_apply_pre_fwd(x3, h2):
    t, n, c = x3.shape
    u = torch.empty(t, c, device=x3.device, dtype=x3.dtype)
    if t > 0:
        _apply_pre_fwd_kernel[_grid(t)](x3, h2, u, t, c, N=n, NP=next_pow2(n))
    return u


def launch_apply_pre_bwd(x3, h2, g2, need_x: bool, need_h: bool):
    """(grad_x in x's dtype or None, grad_h in fp32 or None)."""
    t, n, c = x3.shape
    gx = torch.empty_like(x3) if need_x else None
    gh = torch.empty(t, n, device=x3.device, dtype=torch.float32) if need_h else None
    if t > 0 and (need_x or need_h):
        _apply_pre_bwd_kernel[_grid(t)](
            x3, h2, g2, gx if need_x else g2, gh if need_h else g2, t, c,
            N=n, NP=next_pow2(n), NEED_X=need_x, NEED_H=need_h)
    return gx, gh


def launch_apply_post_res_fwd(x3, y2, hp, hr):
    t, n, c = x3.shape
    out = torch.empty_like(x3)
    if t > 0:
        _apply_post_res_fwd_kernel[_grid(t)](x3, y2, hp, hr, out, t, c, N=n, NP=next_pow2(n))
    return out


def launch_apply_post_res_bwd(x3, y2, hp, hr, g, need):
    """(grad_x, grad_y in their inputs' dtypes, grad_h_post, grad_h_res in fp32), None where
    ``need`` says no."""
    t, n, c = x3.shape
    gx = torch.empty_like(x3) if need[0] else None
    gy = torch.empty_like(y2) if need[1] else None
    ghp = torch.empty(t, n, device=x3.device, dtype=torch.float32) if need[2] else None
    ghr = torch.empty(t, n, n, device=x3.device, dtype=torch.float32) if need[3] else None
    if t > 0 and any(need):
        g = g.contiguous()
        _apply_post_res_bwd_kernel[_grid(t)](
            x3, y2, hp, hr, g, gx if need[0] else g, gy if need[1] else g,
            ghp if need[2] else g, ghr if need[3] else g, t, c,
            N=n, NP=next_pow2(n), NEED_X=need[0], NEED_Y=need[1], NEED_HP=need[2], NEED_HR=need[3])
    return gx, gy, ghp, ghr


# --------------------------------------------------------------------------------------------
# The ops' contracts (``<op>_forward`` / ``<op>_backward``, as in ``residual.torch_ops``): checked
# inputs of any leading shape, made contiguous [T, ...] for the launches
# --------------------------------------------------------------------------------------------


def _pre_operands(x, h_pre):
    n, c = check_streams("x", x)
    check_tensor("h_pre", h_pre)
    lead = tuple(x.shape[:-2])
    check_shape("h_pre", h_pre, (*lead, n), "[..., n]")
    check_devices(_apply_pre_fwd_kernel, x=x, h_pre=h_pre)
    t = num_tokens(lead)
    return lead, x.reshape(t, n, c).contiguous(), h_pre.reshape(t, n).contiguous()


def apply_pre_forward(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """u [..., C] = sum_i h_pre[..., i] x[..., i, :], in x's dtype."""
    lead, x3, h2 = _pre_operands(x, h_pre)
    return launch_apply_pre_fwd(x3, h2).reshape(*lead, x.shape[-1])


def apply_pre_backward(x, h_pre, grad, needs):
    """(grad_x, grad_h_pre) in their inputs' dtypes, None where ``needs`` says no."""
    lead, x3, h2 = _pre_operands(x, h_pre)
    gx, gh = launch_apply_pre_bwd(x3, h2, grad.reshape(x3.shape[0], x3.shape[-1]).contiguous(), needs[0], needs[1])
    return (gx.reshape(x.shape) if gx is not None else None,
            gh.reshape(h_pre.shape).to(h_pre.dtype) if gh is not None else None)


def _post_res_operands(x, y, h_post, h_res):
    n, c = check_streams("x", x)
    for name, t in (("y", y), ("h_post", h_post), ("h_res", h_res)):
        check_tensor(name, t)
    lead = tuple(x.shape[:-2])
    check_shape("y", y, (*lead, c), "[..., C]")
    check_shape("h_post", h_post, (*lead, n), "[..., n]")
    check_shape("h_res", h_res, (*lead, n, n), "[..., n, n]")
    check_devices(_apply_post_res_fwd_kernel, x=x, y=y, h_post=h_post, h_res=h_res)
    t = num_tokens(lead)
    return (x.reshape(t, n, c).contiguous(), y.reshape(t, c).contiguous(),
            h_post.reshape(t, n).contiguous(), h_res.reshape(t, n, n).contiguous())


def apply_post_res_forward(x, y, h_post, h_res) -> torch.Tensor:
    """h_res @ x + h_post^T y, [..., n, C] in x's dtype."""
    return launch_apply_post_res_fwd(*_post_res_operands(x, y, h_post, h_res)).reshape(x.shape)


def apply_post_res_backward(x, y, h_post, h_res, grad, needs):
    """(grad_x, grad_y, grad_h_post, grad_h_res) in their inputs' dtypes, None where ``needs``
    says no."""
    operands = _post_res_operands(x, y, h_post, h_res)
    grads = launch_apply_post_res_bwd(*operands, grad.reshape(operands[0].shape), needs)
    return tuple(g.reshape(t.shape).to(t.dtype) if g is not None else None
                 for g, t in zip(grads, (x, y, h_post, h_res)))


# --------------------------------------------------------------------------------------------
# Autograd of the kernels alone (``mhc_kernels.apply_pre`` / ``apply_post_res``; the model's
# ops use ``torch.ops.mhc.*``, whose autograd runs the same functions)
# --------------------------------------------------------------------------------------------


class ApplyPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h_pre):
        ctx.save_for_backward(x, h_pre)
        return apply_pre_forward(x, h_pre)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        return apply_pre_backward(*ctx.saved_tensors, g, ctx.needs_input_grad)


class ApplyPostRes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, h_post, h_res):
        ctx.save_for_backward(x, y, h_post, h_res)
        return apply_post_res_forward(x, y, h_post, h_res)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        return apply_post_res_backward(*ctx.saved_tensors, g, ctx.needs_input_grad)


def apply_pre(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Triton ``apply_pre``: same contract as ``mhc_train.residual.ops.apply_pre``."""
    if torch.is_grad_enabled() and (x.requires_grad or h_pre.requires_grad):
        return ApplyPre.apply(x, h_pre)
    return apply_pre_forward(x, h_pre)


def apply_post_res(x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor) -> torch.Tensor:
    """Triton ``apply_post_res``: same contract as ``mhc_train.residual.ops.apply_post_res``."""
    if torch.is_grad_enabled() and any(a.requires_grad for a in (x, y, h_post, h_res)):
        return ApplyPostRes.apply(x, y, h_post, h_res)
    return apply_post_res_forward(x, y, h_post, h_res)
