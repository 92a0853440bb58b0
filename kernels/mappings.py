"""The mHC mappings in Triton (paper Eq 14-19): forward and backward kernels.

Reference (the specification): ``mhc_train.residual.torch_ops.mhc_mappings_forward`` /
``_backward``; ``mhc_mappings_forward`` / ``_backward`` here are the Triton implementation of
``torch.ops.mhc.mhc_mappings``.

Layout: x ``[T, n, C]`` read as ``[T, K]`` with K = nC stream-major; phi ``[K, W]`` with
W = n^2 + 2n columns pre (n) | post (n) | res (n^2, row-major); alpha ``[3]``; bias ``[W]``.

Kernels (per token, in elements):

* ``_mhc_fwd_kernel`` (shared with ``fused_pre``): one pass over x computing x.phi with ``tl.dot``
  (W padded to WP = next power of two >= 16, masked) together with the sum of squares (fp32),
  then 1/r, alpha, bias, sigmoid, 2 sigmoid and Sinkhorn, all in registers. Reads nC
  (+ phi from L2, shared by the tokens of a program), writes 2n + n^2 coefficients, and when a
  backward follows also proj (W) and 1/r (1) for it. With ``COMPUTE_U`` it also writes
  u = H_pre x (see ``fused_pre.py``).
* ``_mhc_coef_bwd_kernel``: recomputes the logits from proj and 1/r, back-propagates sigmoid,
  2 sigmoid and Sinkhorn (``sinkhorn.sk_backward``, on chip) and writes g_proj = dL/d(x phi)
  (W), the RMS coefficient ``coef`` (1) and per-program partial sums for grad alpha and grad
  bias. Reads W + 1 + 2n + n^2. With ``HAS_U`` (the fused read, ``fused_pre.py``) it first sums
  x . g_u over C into H_pre's gradient (reads nC + C more): one launch, no [T, n] round trip.
* ``_mhc_proj_bwd_kernel``: the two matmuls of the backward in one kernel:
  grad_x = g_proj phi^T + coef * x (+ h_pre (x) g_u for the fused read) and grad_phi = x^T g_proj.
  A program owns a K slice, BLOCK_K / NP features of all n streams (its phi slice stays in
  registers for all its tokens), and a strided share of the token blocks; per token it reads x
  once (nC), g_u once (C), h_pre (n), g_proj (W) and coef once per K slice, and writes grad_x
  (nC); grad_phi partials of the token splits are summed by torch. Autotuned (BLOCK_K, warps).

``tl.dot`` operands are >= 16 in every dimension (BLOCK_T >= 16, BLOCK_K >= 32, WP >= 16), as
GPUs need. Its fp32 precision follows ``torch.get_float32_matmul_precision()`` (see
``_common.dot_precision``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._common import (
    check_devices, check_shape, check_streams, check_t_max, check_tensor, dot_precision, interpreting, next_pow2,
    num_tokens, quick_autotune, warp_configs,
)
from .sinkhorn import sk_backward, sk_exp, sk_forward, token_block

# Tokens per program of the tl.dot kernels (the M dimension, >= 16 for tl.dot on GPUs). The
# forward re-reads phi (nC x W, L2-resident) once per program, so larger token blocks cut that
# L2 traffic (n = 4, C = 2560: ~1 MB of phi per 32 tokens); with COMPUTE_U the second pass over x
# wants the program's rows still in L2, so the fused forward takes smaller blocks (see
# fused_pre.py). The grad kernel keeps its phi slice in registers and loops over tokens.
# Untuned: no GPU was available when these were chosen.
FWD_BLOCK_T = 32
FUSED_FWD_BLOCK_T = 16
DOT_BLOCK_T = 16


@triton.autotune(configs=warp_configs(), key=["C", "N", "STORE_PROJ", "COMPUTE_U"])
@triton.jit
def _mhc_fwd_kernel(
    x_ptr, phi_ptr, alpha_ptr, bias_ptr,
    proj_ptr, inv_r_ptr, h_pre_ptr, h_post_ptr, h_res_ptr, u_ptr,
    T, C, t_max, eps,
    N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    STORE_PROJ: tl.constexpr, COMPUTE_U: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok = rows < T
    rows64 = rows.to(tl.int64)
    K = N * C
    cols = tl.arange(0, WP)
    col_ok = cols < W

    # Eq 14-15: x phi and sum of squares in one scan over x.
    acc = tl.zeros([BLOCK_T, WP], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xb = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=tok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)
        sumsq += tl.sum(xb * xb, axis=1)
        pb = tl.load(phi_ptr + ks[:, None] * W + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                     other=0.0).to(tl.float32)
        acc = tl.dot(xb, pb, acc, input_precision=DOT_PRECISION)
    inv_r = tl.where(tok, tl.rsqrt(tl.where(tok, sumsq / K + eps, 1.0)), 0.0)  # padded tokens: 0
    if STORE_PROJ:
        tl.store(proj_ptr + rows64[:, None] * W + cols[None, :], acc, mask=tok[:, None] & col_ok[None, :])
        tl.store(inv_r_ptr + rows, inv_r, mask=tok)

    # Eq 16: H~ = (1/r) alpha (x phi) + b, the gate spread over pre | post | res columns.
    a_pre = tl.load(alpha_ptr).to(tl.float32)
    a_post = tl.load(alpha_ptr + 1).to(tl.float32)
    a_res = tl.load(alpha_ptr + 2).to(tl.float32)
    gate = tl.where(cols < N, a_pre, tl.where(cols < 2 * N, a_post, a_res))
    b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    logits = (acc * inv_r[:, None]) * gate[None, :] + b[None, :]

    # Eq 17-18, stored straight from the [BLOCK_T, WP] tile.
    sig = tl.sigmoid(logits)
    tl.store(h_pre_ptr + rows64[:, None] * N + cols[None, :], sig,
             mask=tok[:, None] & (cols < N)[None, :])
    tl.store(h_post_ptr + rows64[:, None] * N + (cols[None, :] - N), 2.0 * sig,
             mask=tok[:, None] & ((cols >= N) & (cols < 2 * N))[None, :])

    # Eq 19: move the res columns into a [BLOCK_T, NP, NP] tile (one-hot selects, exact),
    # then Sinkhorn in registers.
    idx = tl.arange(0, NP)
    ok = tok[:, None] & (idx < N)[None, :]
    valid = ok[:, :, None] & (idx < N)[None, None, :]
    res = tl.zeros([BLOCK_T, NP, NP], dtype=tl.float32)
    for i in tl.static_range(N):
        for j in tl.static_range(N):
            v = tl.sum(tl.where(cols[None, :] == 2 * N + i * N + j, logits, 0.0), axis=1)
            at = (idx[:, None] == i) & (idx[None, :] == j)
            res = tl.where(at[None, :, :], v[:, None, None], res)
    h_res = sk_forward(sk_exp(res, valid), ok, t_max)
    offs3 = rows64[:, None, None] * (N * N) + idx[None, :, None] * N + idx[None, None, :]
    tl.store(h_res_ptr + offs3, h_res, mask=valid)

    if COMPUTE_U:
        # u = H_pre x: a second pass over this program's x rows (see fused_pre.py).
        h_pre = tl.zeros([BLOCK_T, NP], dtype=tl.float32)
        for i in tl.static_range(N):
            v = tl.sum(tl.where(cols[None, :] == i, sig, 0.0), axis=1)
            h_pre = tl.where((idx == i)[None, :], v[:, None], h_pre)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            c_ok = cs < C
            x3 = tl.load(x_ptr + rows64[:, None, None] * K + idx[None, :, None] * C + cs[None, None, :],
                         mask=ok[:, :, None] & c_ok[None, None, :], other=0.0).to(tl.float32)
            u = tl.sum(h_pre[:, :, None] * x3, axis=1)
            tl.store(u_ptr + rows64[:, None] * C + cs[None, :], u.to(u_ptr.dtype.element_ty),
                     mask=tok[:, None] & c_ok[None, :])


@triton.jit
def _gate_part_bwd(proj_ptr, bias_ptr, g_ptr, g_proj_ptr, bias_part, alpha_part,
                   rows64, inv_r, a, idx, ok, scale, extra,
                   OFFSET: tl.constexpr, N: tl.constexpr, W: tl.constexpr, LOAD_G: tl.constexpr):
    """Backward of h = scale * sigmoid(logits) for the n columns starting at OFFSET; the
    incoming gradient is the one at g_ptr (if LOAD_G) plus ``extra`` [BLOCK_T, NP].

    Stores g_proj and the grad bias / alpha partials of these columns; returns
    sum_cols(g_logits * gate * proj) per token (the RMS term).
    """
    col = idx + OFFSET
    p = tl.load(proj_ptr + rows64[:, None] * W + col[None, :], mask=ok, other=0.0)
    b = tl.load(bias_ptr + col, mask=idx < N, other=0.0).to(tl.float32)
    h = tl.sigmoid((p * inv_r[:, None]) * a + b[None, :])
    g = extra
    if LOAD_G:
        g += tl.load(g_ptr + rows64[:, None] * N + idx[None, :], mask=ok, other=0.0).to(tl.float32)
    gl = (scale * g) * (1.0 - h) * h  # torch's sigmoid backward
    tl.store(g_proj_ptr + rows64[:, None] * W + col[None, :], (gl * a) * inv_r[:, None], mask=ok)
    tl.store(bias_part + col, tl.sum(gl, axis=0), mask=idx < N)
    tl.store(alpha_part + col, tl.sum(gl * p * inv_r[:, None], axis=0), mask=idx < N)
    return tl.sum((gl * a) * p, axis=1)


@triton.autotune(configs=warp_configs(), key=["C", "N", "HAS_PRE", "HAS_POST", "HAS_RES", "HAS_U"])
@triton.jit
def _mhc_coef_bwd_kernel(
    proj_ptr, inv_r_ptr, alpha_ptr, bias_ptr,
    g_pre_ptr, g_post_ptr, g_res_ptr,
    g_proj_ptr, coef_ptr, part_ptr, x_ptr, g_u_ptr,
    T, C, t_max,
    N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_RES: tl.constexpr, HAS_U: tl.constexpr,
):
    # g_proj and part arrive zeroed: the parts without an incoming gradient store nothing.
    # HAS_U (the fused read, u = H_pre x): H_pre's gradient gets sum_c x[s, c] g_u[c] too, from a
    # pass over this program's x rows and g_u (the first of the backward's two passes over x).
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tok = rows < T
    rows64 = rows.to(tl.int64)
    idx = tl.arange(0, NP)
    ok = tok[:, None] & (idx < N)[None, :]
    inv_r = tl.load(inv_r_ptr + rows, mask=tok, other=0.0)
    # part rows: [program, 0, W] = sum over tokens of g_logits (grad bias),
    #            [program, 1, W] = sum over tokens of g_logits * proj / r (grad alpha, per column)
    bias_part = part_ptr + pid * 2 * W
    alpha_part = bias_part + W
    K = N * C
    dot_gp = tl.zeros([BLOCK_T], dtype=tl.float32)  # sum over columns of g_logits * gate * proj
    g_h_pre = tl.zeros([BLOCK_T, NP], dtype=tl.float32)
    if HAS_U:
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            c_ok = cs < C
            xb = tl.load(x_ptr + rows64[:, None, None] * K + idx[None, :, None] * C + cs[None, None, :],
                         mask=ok[:, :, None] & c_ok[None, None, :], other=0.0).to(tl.float32)
            gu = tl.load(g_u_ptr + rows64[:, None] * C + cs[None, :], mask=tok[:, None] & c_ok[None, :],
                         other=0.0).to(tl.float32)
            g_h_pre += tl.sum(xb * gu[:, None, :], axis=2)
    if HAS_PRE or HAS_U:
        a = tl.load(alpha_ptr).to(tl.float32)
        dot_gp += _gate_part_bwd(proj_ptr, bias_ptr, g_pre_ptr, g_proj_ptr, bias_part, alpha_part,
                                 rows64, inv_r, a, idx, ok, 1.0, g_h_pre, 0, N, W, HAS_PRE)
    if HAS_POST:
        a = tl.load(alpha_ptr + 1).to(tl.float32)
        dot_gp += _gate_part_bwd(proj_ptr, bias_ptr, g_post_ptr, g_proj_ptr, bias_part, alpha_part,
                                 rows64, inv_r, a, idx, ok, 2.0, tl.zeros([BLOCK_T, NP], dtype=tl.float32),
                                 N, N, W, True)
    if HAS_RES:
        valid = ok[:, :, None] & (idx < N)[None, None, :]
        col3 = 2 * N + idx[:, None] * N + idx[None, :]  # [NP, NP]: column of res entry (i, j)
        ok2 = (idx < N)[:, None] & (idx < N)[None, :]
        a = tl.load(alpha_ptr + 2).to(tl.float32)
        p = tl.load(proj_ptr + rows64[:, None, None] * W + col3[None, :, :], mask=valid, other=0.0)
        b = tl.load(bias_ptr + col3, mask=ok2, other=0.0).to(tl.float32)
        logits = (p * inv_r[:, None, None]) * a + b[None, :, :]
        offs3 = rows64[:, None, None] * (N * N) + idx[None, :, None] * N + idx[None, None, :]
        g = tl.load(g_res_ptr + offs3, mask=valid, other=0.0).to(tl.float32)
        gl = sk_backward(sk_exp(logits, valid), g, ok, t_max)
        tl.store(g_proj_ptr + rows64[:, None, None] * W + col3[None, :, :], (gl * a) * inv_r[:, None, None],
                 mask=valid)
        dot_gp += tl.sum(tl.sum((gl * a) * p, axis=2), axis=1)
        tl.store(bias_part + col3, tl.sum(gl, axis=0), mask=ok2)
        tl.store(alpha_part + col3, tl.sum(gl * p * inv_r[:, None, None], axis=0), mask=ok2)
    # d(1/r)/dx = -x / (K r^3): grad_x gets coef * x with coef = -sum(g gate proj) / (K r^3).
    coef = -dot_gp * (inv_r * inv_r * inv_r) / K
    tl.store(coef_ptr + rows, coef, mask=tok)


def _proj_bwd_configs():
    """Autotune configs of ``_mhc_proj_bwd_kernel``, chosen at import time.

    On a GPU (Hopper in mind: 64K registers per SM, up to 228 KB shared memory): BLOCK_K (the
    program's K slice, all n streams x BLOCK_K / NP features) of 64-256, so the phi^T slice
    (WP x BLOCK_K fp32, 8-32 KB) and the grad_phi accumulator (BLOCK_K x WP) stay in registers,
    with 4 or 8 warps. Under TRITON_INTERPRET=1 a single config: the interpreter cannot run a
    multi-config autotune (it benchmarks with the GPU timer), and one config skips the
    benchmark. Untuned on hardware: no GPU was available when these were chosen.
    """
    if interpreting():
        return [triton.Config({"BLOCK_K": 64}, num_warps=4)]
    if quick_autotune():
        return [triton.Config({"BLOCK_K": 128}, num_warps=4, num_stages=2)]
    return [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bk in (64, 128, 256) for w in (4, 8) for s in (2, 3)]


@triton.autotune(configs=_proj_bwd_configs(), key=["C", "N", "NEED_X", "NEED_PHI", "ADD_PRE"])
@triton.jit
def _mhc_proj_bwd_kernel(
    x_ptr, phi_ptr, g_proj_ptr, coef_ptr, h_pre_ptr, g_u_ptr,
    grad_x_ptr, grad_phi_ptr,
    T, C, n_splits,
    N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    NEED_X: tl.constexpr, NEED_PHI: tl.constexpr, ADD_PRE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # The program's K slice: features [pid_c * BLOCK_C, +BLOCK_C) of every stream, flattened
    # stream-major (j = s * BLOCK_C + c), so a token's g_u block and h_pre row are loaded once
    # for all n streams (not once per stream, nor h_pre once per element).
    BLOCK_C: tl.constexpr = BLOCK_K // NP
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    K = N * C
    j = tl.arange(0, BLOCK_K)
    s_idx = j // BLOCK_C
    c_idx = pid_c * BLOCK_C + (j - s_idx * BLOCK_C)
    k_ok = (s_idx < N) & (c_idx < C)
    ks = s_idx * C + c_idx
    cols = tl.arange(0, WP)
    col_ok = cols < W
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    idx = tl.arange(0, NP)
    phi_t = tl.load(phi_ptr + ks[None, :] * W + cols[:, None], mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)  # [WP, BLOCK_K] = phi^T slice, on chip for all tokens
    acc = tl.zeros([BLOCK_K, WP], dtype=tl.float32)
    for tb in range(pid_s, tl.cdiv(T, BLOCK_T), n_splits):
        rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        tok = rows < T
        rows64 = rows.to(tl.int64)
        mask = tok[:, None] & k_ok[None, :]
        xb = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        gp = tl.load(g_proj_ptr + rows64[:, None] * W + cols[None, :], mask=tok[:, None] & col_ok[None, :],
                     other=0.0)
        if NEED_X:
            cf = tl.load(coef_ptr + rows, mask=tok, other=0.0)
            gx = cf[:, None] * xb
            gx = tl.dot(gp, phi_t, gx, input_precision=DOT_PRECISION)
            if ADD_PRE:  # u = H_pre x: grad_x[s, c] += h_pre[s] g_u[c]
                hp = tl.load(h_pre_ptr + rows64[:, None] * N + idx[None, :], mask=tok[:, None] & (idx < N)[None, :],
                             other=0.0).to(tl.float32)
                gu = tl.load(g_u_ptr + rows64[:, None] * C + cs[None, :], mask=tok[:, None] & (cs < C)[None, :],
                             other=0.0).to(tl.float32)
                gx += tl.reshape(hp[:, :, None] * gu[:, None, :], [BLOCK_T, BLOCK_K])
            tl.store(grad_x_ptr + rows64[:, None] * K + ks[None, :], gx.to(grad_x_ptr.dtype.element_ty), mask=mask)
        if NEED_PHI:
            acc = tl.dot(tl.trans(xb), gp, acc, input_precision=DOT_PRECISION)
    if NEED_PHI:
        tl.store(grad_phi_ptr + pid_s * K * W + ks[:, None] * W + cols[None, :], acc,
                 mask=k_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _widths(n: int) -> tuple[int, int]:
    w = n * n + 2 * n
    return w, max(16, next_pow2(w))


def _block_k(wp: int) -> int:
    return 64 if wp <= 32 else 32


def launch_mappings_fwd(x2, phi, alpha, bias, n, c, t_max, eps, store_proj, u_dtype=None):
    """Raw forward on contiguous x2 [T, n, C]: (h_pre, h_post, h_res, proj, inv_r, u).

    proj / inv_r are None unless ``store_proj``; u is None unless ``u_dtype`` is given.
    """
    t = x2.shape[0]
    w, wp = _widths(n)
    dev = x2.device
    h_pre = torch.empty(t, n, device=dev, dtype=torch.float32)
    h_post = torch.empty(t, n, device=dev, dtype=torch.float32)
    h_res = torch.empty(t, n, n, device=dev, dtype=torch.float32)
    proj = torch.empty(t, w, device=dev, dtype=torch.float32) if store_proj else None
    inv_r = torch.empty(t, device=dev, dtype=torch.float32) if store_proj else None
    u = torch.empty(t, c, device=dev, dtype=u_dtype) if u_dtype is not None else None
    if t > 0:
        npad = next_pow2(n)
        block_t = FWD_BLOCK_T if u is None else FUSED_FWD_BLOCK_T
        block_c = max(16, min(next_pow2(c), 4096 // (block_t * npad)))
        _mhc_fwd_kernel[(triton.cdiv(t, block_t),)](
            x2, phi, alpha, bias,
            proj if store_proj else h_pre, inv_r if store_proj else h_pre, h_pre, h_post, h_res,
            u if u is not None else h_pre,
            t, c, t_max, float(eps),
            N=n, NP=npad, W=w, WP=wp, BLOCK_T=block_t, BLOCK_K=_block_k(wp), BLOCK_C=block_c,
            STORE_PROJ=store_proj, COMPUTE_U=u is not None, DOT_PRECISION=dot_precision(),
        )
    return h_pre, h_post, h_res, proj, inv_r, u


def _token_splits(t: int, k_blocks: int, target_programs: int = 512) -> int:
    """Token splits of the grad_phi reduction: enough programs to fill a GPU, no more."""
    t_blocks = triton.cdiv(t, DOT_BLOCK_T)
    return max(1, min(t_blocks, triton.cdiv(target_programs, k_blocks)))


def launch_mappings_bwd(x2, phi, alpha, bias, proj, inv_r, n, c, t_max, g_pre, g_post, g_res,
                      need_x, need_phi, h_pre=None, g_u=None):
    """Raw backward: (grad_x [T, n, C] or None, grad_phi, grad_alpha, grad_bias) in fp32.

    ``h_pre`` / ``g_u`` (fused op): adds u = H_pre x's direct gradient h_pre (x) g_u to grad_x;
    the coefficient kernel adds u's gradient wrt h_pre (x . g_u) to g_pre itself.
    """
    t = x2.shape[0]
    w, wp = _widths(n)
    k = n * c
    dev = x2.device
    npad = next_pow2(n)
    block_t = token_block(n, t)
    n_blocks = triton.cdiv(t, block_t) if t > 0 else 0
    g_proj = torch.zeros(t, w, device=dev, dtype=torch.float32)
    coef = torch.empty(t, device=dev, dtype=torch.float32)
    part = torch.zeros(max(n_blocks, 1), 2, w, device=dev, dtype=torch.float32)
    if g_u is not None:
        g_u = g_u.contiguous()
    if t > 0:
        dummy = g_proj
        _mhc_coef_bwd_kernel[(n_blocks,)](
            proj, inv_r, alpha, bias,
            g_pre.contiguous() if g_pre is not None else dummy,
            g_post.contiguous() if g_post is not None else dummy,
            g_res.contiguous() if g_res is not None else dummy,
            g_proj, coef, part, x2, g_u if g_u is not None else dummy,
            t, c, t_max,
            N=n, NP=npad, W=w, BLOCK_T=block_t, BLOCK_C=max(16, min(next_pow2(c), 4096 // (block_t * npad))),
            HAS_PRE=g_pre is not None, HAS_POST=g_post is not None, HAS_RES=g_res is not None,
            HAS_U=g_u is not None,
        )
    sums = part.sum(dim=0)  # [2, W]
    grad_bias = sums[0]
    grad_alpha = torch.stack([sums[1, :n].sum(), sums[1, n : 2 * n].sum(), sums[1, 2 * n :].sum()])

    grad_x = torch.empty(x2.shape, device=dev, dtype=x2.dtype) if need_x else None
    grad_phi = None
    if need_phi and t == 0:
        grad_phi = torch.zeros(k, w, device=dev, dtype=torch.float32)
    if t > 0 and (need_x or need_phi):
        # token splits of the grad_phi sum: fixed before the launch (the partials buffer depends
        # on it), sized for the smallest autotuned K slice
        k_blocks = triton.cdiv(c, 64 // npad)
        splits = _token_splits(t, k_blocks)
        phi_part = torch.empty(splits, k, w, device=dev, dtype=torch.float32) if need_phi else None
        add_pre = need_x and g_u is not None
        _mhc_proj_bwd_kernel[lambda meta: (triton.cdiv(c, meta["BLOCK_K"] // npad), splits)](
            x2, phi, g_proj, coef,
            h_pre if add_pre else coef, g_u if add_pre else coef,
            grad_x if need_x else coef, phi_part if need_phi else coef,
            t, c, splits,
            N=n, NP=npad, W=w, WP=wp, BLOCK_T=DOT_BLOCK_T,
            NEED_X=need_x, NEED_PHI=need_phi, ADD_PRE=add_pre, DOT_PRECISION=dot_precision(),
        )
        if need_phi:
            grad_phi = phi_part[0] if splits == 1 else phi_part.sum(dim=0)
    return grad_x, grad_phi, grad_alpha, grad_bias


# --------------------------------------------------------------------------------------------
# Autograd op and public entry
# --------------------------------------------------------------------------------------------


def check_mapping_inputs(x, phi, alpha, bias, t_max, eps):
    """Validate (x, phi, alpha, bias, t_max, eps); returns (n, C, t_max, eps)."""
    n, c = check_streams("x", x)
    for name, t in (("phi", phi), ("alpha", alpha), ("bias", bias)):
        check_tensor(name, t)
    w = n * n + 2 * n
    check_shape("phi", phi, (n * c, w), "[n*C, n*n+2n]")
    check_shape("alpha", alpha, (3,), "[3] = pre, post, res")
    check_shape("bias", bias, (w,), "[n*n+2n]")
    t_max = check_t_max(t_max)
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_devices(_mhc_fwd_kernel, x=x, phi=phi, alpha=alpha, bias=bias)
    return n, c, t_max, eps


def mapping_operands(x, phi, alpha, bias, t_max, eps):
    """Checked inputs as the launches take them: (n, C, t_max, eps, x2 [T, n, C], phi, alpha,
    bias), all contiguous."""
    n, c, t_max, eps = check_mapping_inputs(x, phi, alpha, bias, t_max, eps)
    x2 = x.reshape(num_tokens(x.shape[:-2]), n, c).contiguous()
    return n, c, t_max, eps, x2, phi.contiguous(), alpha.contiguous(), bias.contiguous()


def mapping_grads(x, phi, alpha, bias, grads, needs):
    """The launch's fp32 (grad_x, grad_phi, grad_alpha, grad_bias) as the ops return them: in
    their inputs' shapes and dtypes, None where ``needs`` says no."""
    return tuple(g.reshape(t.shape).to(t.dtype) if need else None
                 for g, t, need in zip(grads, (x, phi, alpha, bias), needs))


def mhc_mappings_forward(x, phi, alpha, bias, t_max, eps):
    """(h_pre, h_post, h_res, proj, inv_r): the contract of ``torch_ops.mhc_mappings_forward``.
    proj [T, W] and 1/r [T, 1] are what the backward recomputes the coefficients from."""
    n, c, t_max, eps, *operands = mapping_operands(x, phi, alpha, bias, t_max, eps)
    lead = x.shape[:-2]
    h_pre, h_post, h_res, proj, inv_r, _ = launch_mappings_fwd(*operands, n, c, t_max, eps, True)
    return h_pre.reshape(*lead, n), h_post.reshape(*lead, n), h_res.reshape(*lead, n, n), proj, inv_r.view(-1, 1)


def mhc_mappings_backward(x, phi, alpha, bias, proj, inv_r, h_pre, h_post, g_pre, g_post, g_res, t_max, needs):
    """(grad_x, grad_phi, grad_alpha, grad_bias), None where ``needs`` says no; ``g_*`` None:
    that output got no gradient. (h_pre, h_post: unused here, in the contract for the torch
    reference, which back-propagates through them.)"""
    n, c, t_max, _, *operands = mapping_operands(x, phi, alpha, bias, t_max, 0.0)
    grads = launch_mappings_bwd(*operands, proj, inv_r.reshape(-1), n, c, t_max, g_pre, g_post, g_res,
                                need_x=needs[0], need_phi=needs[1])
    return mapping_grads(x, phi, alpha, bias, grads, needs)


class MHCMappings(torch.autograd.Function):
    """Autograd of the kernels alone (``mhc_kernels.mhc_mappings``): (x, phi, alpha, bias) ->
    (h_pre, h_post, h_res) fp32. Saves x, phi, alpha, bias and W + 1 fp32 values per token
    (proj, 1/r); the backward recomputes the logits and the Sinkhorn iterations from them."""

    @staticmethod
    def forward(ctx, x, phi, alpha, bias, t_max, eps):
        h_pre, h_post, h_res, proj, inv_r = mhc_mappings_forward(x, phi, alpha, bias, t_max, eps)
        ctx.save_for_backward(x, phi, alpha, bias, proj, inv_r)
        ctx.t_max = t_max
        ctx.set_materialize_grads(False)
        return h_pre, h_post, h_res

    @staticmethod
    @once_differentiable
    def backward(ctx, g_pre, g_post, g_res):
        x, phi, alpha, bias, proj, inv_r = ctx.saved_tensors
        grads = mhc_mappings_backward(x, phi, alpha, bias, proj, inv_r, None, None, g_pre, g_post, g_res,
                                      ctx.t_max, ctx.needs_input_grad[:4])
        return (*grads, None, None)


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def mhc_mappings(x, phi, alpha, bias, t_max, eps=0.0):
    """Triton ``mhc_mappings``: same contract as ``mhc_train.residual.ops.mhc_mappings``."""
    if needs_grad(x, phi, alpha, bias):
        return MHCMappings.apply(x, phi, alpha, bias, t_max, eps)
    return mhc_mappings_forward(x, phi, alpha, bias, t_max, eps)[:3]
