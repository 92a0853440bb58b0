"""The torch reference of the mHC ops: each op's forward and backward as plain functions.

``torch.ops.mhc.<op>`` (``residual.custom_ops``) runs ``<op>_forward`` / ``<op>_backward`` from this
file with ``backend="torch"`` and the functions of the same names in ``mhc_kernels`` with
``backend="triton"``: this file is the specification the kernels must equal (tests/test_kernels.py,
``backend.self_test``). Everything here runs below autograd; the autograd formulas that call the
backwards live with the op definitions.

Plain autograd of the stream ops makes several passes over the [..., n, C] streams per op
(broadcast products, their backwards, the sum of partial gradients); these functions do the
fewest: batched matmuls on contiguous operands, and for the mappings one matmul plus one
fused update for the RMS term. They are checked against the plain formulas by gradcheck
(tests/test_ops.py).

CPU notes that shaped the code (measured inside a training step, 2048 tokens, n = 4, C = 256):

- A fresh stream-sized temporary costs more than most products over it, so none is made that
  is not an output.
- bmm operands must have contiguous (or transposed) batch items: anything else, such as the
  stride-0 stream axis of the last write's gradient, falls back to one small matmul per token.
- bmm's per-token matrix-vector products (``[T, n, C] x [T, C, 1]``) are slow; ``_row_dot``
  multiplies and sums blocks of tokens through one cache-sized temporary, 2x faster.
- Stream gradients are returned as fresh tensors, not views: autograd can add another gradient
  of the same tensor into such a tensor in place instead of allocating a third one.
- The model's read (``mhc_read_res_mix``) and write (``apply_post``) keep the streams stored
  stream-major ([n, T, C] memory behind the logical [..., n, C] tensor): a per-token n x n mix
  is then n bmm calls that each write a contiguous [T, C] plane, ~2x faster than one bmm of
  n x n matrices whose output rows interleave (2-3% of the whole step).

Output layouts are fixed (contiguous, or stream-major where documented): the ops' fake
implementations state them, and ``torch.library.opcheck`` holds the two to each other.
"""

from __future__ import annotations

import functools

import torch

from mhc_train.residual.sinkhorn import sinkhorn_backward, sinkhorn_forward, sinkhorn_recompute


def fp32_maths(fn):
    """Run ``fn`` with autocast off: the mappings' maths is fp32 for any activation dtype
    (autocast would run its matmuls in bf16, and refuses the in-place products of an fp32
    buffer with bf16 operands)."""

    @functools.wraps(fn)
    def run(*args):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args)

    return run


def _flat(x: torch.Tensor, n: int, c: int) -> torch.Tensor:
    return x.reshape(-1, n, c)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """The maths dtype: fp32 for bf16/fp16/fp32 inputs, fp64 kept (gradcheck runs in fp64)."""
    return t if t.dtype == torch.float64 else t.float()


# Tokens per block of _row_dot on CPU: a [tokens, n, C] fp32 temporary of ~1 MB stays in cache.
_ROW_DOT_BLOCK_FLOATS = 2**18


def _row_dot(x3: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[T, n, C] . [T, C] -> [T, n]``: each stream's dot product with one vector."""
    t, n, c = x3.shape
    v = v.reshape(t, 1, c)
    if x3.device.type != "cpu":
        return torch.bmm(x3, v.transpose(1, 2)).squeeze(-1)
    out = x3.new_empty(t, n)
    block = max(1, _ROW_DOT_BLOCK_FLOATS // (n * c))
    tmp = x3.new_empty(min(t, block), n, c)
    for lo in range(0, t, block):
        hi = min(t, lo + block)
        torch.sum(torch.mul(x3[lo:hi], v[lo:hi], out=tmp[: hi - lo]), dim=-1, out=out[lo:hi])
    return out


def _stream_sum(h: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
    """``[T, n] x [T, n, C] -> [T, C]``: sum_i h[t, i] x[t, i]."""
    return torch.bmm(h.reshape(-1, 1, x3.shape[-2]), x3).squeeze(1)


def _zeros(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def stream_major_strides(lead, n: int, c: int) -> tuple:
    """Strides of a ``[*lead, n, C]`` tensor stored stream-major ([n, T, C] memory)."""
    strides, step = [], c
    for size in reversed(lead):
        strides.append(step)
        step = step * size
    return (*reversed(strides), step, 1)


def new_stream_major(lead, n: int, c: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh ``[*lead, n, C]`` tensor stored stream-major, and its ``[n, T, C]`` view."""
    out = torch.empty_strided((*lead, n, c), stream_major_strides(lead, n, c), dtype=dtype, device=device)
    return out, out.movedim(-2, 0).reshape(n, -1, c)


def _stream_major(x: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """``[..., n, C] -> [n, T, C]`` contiguous: a view when x is stored stream-major (what
    ``mhc_read_res_mix`` and ``apply_post`` produce), else a copy."""
    sm = x.movedim(-2, 0).reshape(n, -1, c)
    return sm if sm.is_contiguous() else sm.contiguous()


def as_stream_major(x: torch.Tensor) -> torch.Tensor:
    """x ``[..., n, C]`` stored stream-major: x itself (a view of it) when it is, else a copy."""
    lead, (n, c) = x.shape[:-2], x.shape[-2:]
    return _stream_major(x, n, c).view(n, *lead, c).movedim(0, -2)


def _rows_bmm(mats: torch.Tensor, v_tnc: torch.Tensor, out_sm: torch.Tensor) -> None:
    """out_sm[i] = per-token (row i of mats [T, n, n]) @ v [T, n, C]: each row is one M = 1 bmm
    writing a contiguous [T, C] plane: in a CPU training step (2048 tokens, C = 256) the four
    take 1.1-1.3 ms, one bmm of 4 x 4 matrices (whose output rows interleave) 2-3 ms."""
    t, n, c = v_tnc.shape
    for i in range(n):
        torch.bmm(mats[:, i : i + 1].contiguous(), v_tnc, out=out_sm[i].view(t, 1, c))


# --------------------------------------------------------------------------------------------
# Sinkhorn-Knopp (Eq 9): the maths is in sinkhorn.py
# --------------------------------------------------------------------------------------------


def sinkhorn_knopp_forward(logits: torch.Tensor, t_max: int) -> torch.Tensor:
    """``[..., n, n]`` logits -> doubly stochastic ``[..., n, n]``, fp32 (fp64 kept)."""
    return sinkhorn_forward(at_least_fp32(logits), t_max)


def sinkhorn_knopp_backward(logits: torch.Tensor, grad: torch.Tensor, t_max: int) -> torch.Tensor:
    """d loss / d logits in the logits' dtype, re-running the iterations from the logits."""
    return sinkhorn_backward(at_least_fp32(logits), grad, t_max).to(logits.dtype).contiguous()


# --------------------------------------------------------------------------------------------
# Applying the mappings
# --------------------------------------------------------------------------------------------


def apply_pre_forward(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """u[t] = sum_i h[t, i] x[t, i]  (x [..., n, C], h [..., n], fp32 maths, x's dtype out)."""
    n, c = x.shape[-2:]
    return _stream_sum(at_least_fp32(h_pre), at_least_fp32(_flat(x, n, c))).reshape(*x.shape[:-2], c).to(x.dtype)


def apply_pre_backward(x, h_pre, grad, needs):
    """(grad_x, grad_h_pre), each None unless ``needs`` asks for it."""
    n, c = x.shape[-2:]
    g32 = at_least_fp32(grad)
    grad_x = grad_h = None
    if needs[0]:
        # contiguous: a strided h_pre (HC's, a column of its width matrix) could lead the
        # broadcast product to another layout than the op declares
        grad_x = (at_least_fp32(h_pre).unsqueeze(-1) * g32.unsqueeze(-2)).to(x.dtype).contiguous()
    if needs[1]:
        grad_h = _row_dot(at_least_fp32(_flat(x, n, c)), g32).reshape(h_pre.shape).to(h_pre.dtype)
    return grad_x, grad_h


def apply_post_res_forward(x, y, h_post, h_res):
    """out[t] = h_res[t] @ x[t] + h_post[t]^T y[t]  (x's dtype out).

    Outer products are broadcast multiplies, not K=1 batched matmuls: on CPU those (and
    baddbmm onto a broadcast input) fall back to one small matmul per token and run 10x slower.
    """
    n, c = x.shape[-2:]
    x3 = at_least_fp32(_flat(x, n, c))
    out = torch.bmm(at_least_fp32(h_res.reshape(-1, n, n)), x3)
    out.addcmul_(at_least_fp32(h_post.reshape(-1, n, 1)), at_least_fp32(y.reshape(-1, 1, c)))
    return out.reshape(x.shape).to(x.dtype)


def apply_post_res_backward(x, y, h_post, h_res, grad, needs):
    """(grad_x, grad_y, grad_h_post, grad_h_res), each None unless ``needs`` asks for it."""
    n, c = x.shape[-2:]
    # The gradient of the last write arrives expanded (stride 0 over the streams, from the
    # stream sum before the head): bmm would fall back to one matmul per token.
    g3 = _flat(at_least_fp32(grad), n, c).contiguous()
    grad_x = grad_y = grad_post = grad_res = None
    if needs[0]:
        grad_x = torch.empty(x.shape, dtype=g3.dtype, device=g3.device)
        torch.bmm(at_least_fp32(h_res.reshape(-1, n, n)).transpose(1, 2), g3, out=_flat(grad_x, n, c))
        grad_x = grad_x.to(x.dtype)
    if needs[1]:
        grad_y = _stream_sum(at_least_fp32(h_post), g3).reshape(y.shape).to(y.dtype)
    if needs[2]:
        grad_post = _row_dot(g3, at_least_fp32(y)).reshape(h_post.shape).to(h_post.dtype)
    if needs[3]:
        x_t = at_least_fp32(_flat(x, n, c)).transpose(1, 2)
        grad_res = torch.bmm(g3, x_t).reshape(h_res.shape).to(h_res.dtype)
    return grad_x, grad_y, grad_post, grad_res


def apply_post_forward(res_x, y, h_post, out_dtype: torch.dtype) -> torch.Tensor:
    """out = res_x + h_post^T y: the write of a connection whose read already mixed the streams.

    res_x [..., n, C] (= H_res x, fp32, from ``mhc_read_res_mix``), y [..., C], h_post [..., n]
    -> [..., n, C] in ``out_dtype``, stored stream-major. A new buffer, not res_x updated in
    place: an op may not return its input, and the buffer cost nothing measurable (the sum reads
    and writes the same bytes either way; two connections' read + write, forward and backward,
    2048 tokens, n = 4, C = 256, CPU: 239 ms against 240 ms in place). The gradient of res_x is
    the incoming gradient itself (the autograd formula passes it on); H_res and x get theirs in
    the read's backward, which thereby writes the streams' whole gradient into one buffer.
    """
    lead, (n, c) = res_x.shape[:-2], res_x.shape[-2:]
    h3 = at_least_fp32(h_post).unsqueeze(-1)
    y3 = at_least_fp32(y).unsqueeze(-2)
    out, _ = new_stream_major(lead, n, c, out_dtype, res_x.device)
    if out_dtype == res_x.dtype:
        torch.addcmul(res_x, h3, y3, out=out)
    else:
        out.copy_(torch.addcmul(res_x, h3, y3))  # fp32 sum, rounded once
    return out


def apply_post_backward(y, h_post, grad, needs):
    """(grad_y, grad_h_post) from the gradient of the write's output ([..., n, C] fp32, best
    stored stream-major as the formula hands it over: then no copy is made here)."""
    lead, (n, c) = grad.shape[:-2], grad.shape[-2:]
    g_tnc = _stream_major(at_least_fp32(grad), n, c).transpose(0, 1)
    grad_y = grad_post = None
    if needs[0]:
        grad_y = _stream_sum(at_least_fp32(h_post).reshape(-1, n), g_tnc).reshape(y.shape).to(y.dtype)
    if needs[1]:
        grad_post = _row_dot(g_tnc, at_least_fp32(y)).reshape(h_post.shape).to(h_post.dtype)
    return grad_y, grad_post


# --------------------------------------------------------------------------------------------
# Mappings (Eq 14-19)
# --------------------------------------------------------------------------------------------


def gate(alpha: torch.Tensor, n: int) -> torch.Tensor:
    """alpha (pre, post, res) spread over the pre (n) | post (n) | res (n*n) columns."""
    return torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)])


def _alpha_grad(grad_gate: torch.Tensor, n: int) -> torch.Tensor:
    """``gate``'s backward: the sums of the gate gradient over each alpha's columns (the sums
    autograd took when gate was built outside the ops: the same bits)."""
    return torch.stack([grad_gate[:n].sum(), grad_gate[n : 2 * n].sum(), grad_gate[2 * n :].sum()])


def _logits(proj, inv_r, alpha, bias, n: int) -> torch.Tensor:
    """Eq 16: H~ = (1/r) * gate * (x phi) + bias, [T, W] (the backwards recompute it, bitwise)."""
    return torch.addcmul(at_least_fp32(bias), inv_r * proj, at_least_fp32(gate(alpha, n)))


def _mappings(proj, inv_r, alpha, bias, n: int, t_max: int):
    """Eq 16-19 from the projection [T, W] and 1/RMS [T, 1]: (logits, H_pre, H_post, H_res)."""
    logits = _logits(proj, inv_r, alpha, bias, n)
    h_pre = torch.sigmoid(logits[:, :n])
    h_post = 2.0 * torch.sigmoid(logits[:, n : 2 * n])
    h_res = sinkhorn_forward(logits[:, 2 * n :].reshape(-1, n, n), t_max)
    return logits, h_pre, h_post, h_res


def _weight_grad(flat: torch.Tensor, g_proj: torch.Tensor) -> torch.Tensor:
    """phi's gradient flat^T @ g_proj ([nC, T] x [T, W]), computed as (g_proj^T @ flat)^T: the
    same sums, in the orientation MKL runs faster for W = n^2 + 2n columns (measured on CPU).
    Returned contiguous like phi (nC x W floats): autograd warns about, and copies, a gradient
    whose strides differ from its parameter's."""
    return (g_proj.t() @ flat).t().contiguous()


@fp32_maths
def mhc_mappings_forward(x, phi, alpha, bias, t_max: int, eps: float):
    """(h_pre, h_post, h_res, proj, inv_r): Eq 14-19 per token, proj = x phi [T, W] and
    inv_r = 1/RMS [T, 1] for the backward. r = sqrt(mean(x^2) + eps) over the nC vector."""
    lead, (n, c) = x.shape[:-2], x.shape[-2:]
    x32 = at_least_fp32(x.reshape(-1, n * c))
    proj = x32 @ at_least_fp32(phi)  # [T, W]
    inv_r = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)  # [T, 1]
    _, h_pre, h_post, h_res = _mappings(proj, inv_r, alpha, bias, n, t_max)
    return h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n), proj, inv_r


@fp32_maths
def mhc_mappings_backward(x, phi, alpha, bias, proj, inv_r, h_pre, h_post, g_pre, g_post, g_res,
                          t_max: int, needs):
    """(grad_x, grad_phi, grad_alpha, grad_bias), None where ``needs`` says no; ``g_*`` None:
    that output got no gradient. The mappings' backward is the chain autograd would run
    (sigmoid, 2 sigmoid and Sinkhorn, then the logits), op for op, so it gives the same bits."""
    n, c = x.shape[-2:]
    t = proj.shape[0]
    logits = _logits(proj, inv_r, alpha, bias, n)
    sigmoid_backward = torch.ops.aten.sigmoid_backward
    d_pre = sigmoid_backward(g_pre.reshape(t, n), h_pre.reshape(t, n)) if g_pre is not None else _zeros((t, n), proj)
    # h_post = 2 s: d/ds is 2 g, and s = h_post / 2 exactly
    d_post = (sigmoid_backward(g_post.reshape(t, n) * 2.0, h_post.reshape(t, n) * 0.5) if g_post is not None
              else _zeros((t, n), proj))
    d_res = (sinkhorn_backward(logits[:, 2 * n :].reshape(t, n, n), g_res.reshape(t, n, n), t_max).reshape(t, n * n)
             if g_res is not None else _zeros((t, n * n), proj))
    g = torch.cat([d_pre, d_post, d_res], dim=-1)  # d loss / d logits [T, W]
    x32 = at_least_fp32(x.reshape(t, n * c))
    gate32 = at_least_fp32(gate(alpha, n))
    g_proj = g * gate32 * inv_r  # d logits / d proj
    grad_x = grad_phi = None
    if needs[0]:
        # d inv_r / d x = -inv_r^3 x / D; summed against g * gate * proj.
        coef = -(g * gate32 * proj).sum(dim=-1, keepdim=True) * inv_r.pow(3) / (n * c)
        grad_x = (g_proj @ at_least_fp32(phi).t()).addcmul_(coef, x32).to(x.dtype).reshape(x.shape)
    if needs[1]:
        grad_phi = _weight_grad(x32, g_proj).to(phi.dtype)
    grad_alpha = _alpha_grad((g * proj * inv_r).sum(dim=0), n).to(alpha.dtype) if needs[2] else None
    grad_bias = g.sum(dim=0).to(bias.dtype) if needs[3] else None
    return grad_x, grad_phi, grad_alpha, grad_bias


def _mapping_grads(logits, proj, inv_r, gate32, h_pre, h_post, g_h_pre, g_pre, g_post, g_h_res,
                   t_max: int, stream_numel: int):
    """d loss / d logits [T, W] through sigmoid, 2 sigmoid and Sinkhorn (recomputed); the RMS
    term's per-token coefficient [T, 1] (d loss / d x gets coef * x, from d inv_r / d x =
    -inv_r^3 x / (nC) summed against g_logits * gate * proj); the recomputed H_res [T, n, n]
    (None when H_res got no gradient). ``g_*`` None: that output was unused."""
    t, n = h_pre.shape
    if g_pre is not None:
        g_h_pre = g_h_pre + g_pre.reshape(t, n)
    d_pre = g_h_pre * h_pre * (1.0 - h_pre)  # sigmoid'
    d_post = (g_post.reshape(t, n) * h_post * (1.0 - 0.5 * h_post)) if g_post is not None else _zeros((t, n), logits)
    h_res = None
    if g_h_res is not None:
        h_res, sinkhorn_vjp = sinkhorn_recompute(logits[:, 2 * n :].reshape(t, n, n), t_max)
        d_res = sinkhorn_vjp(g_h_res).reshape(t, n * n)
    else:
        d_res = _zeros((t, n * n), logits)
    g_logits = torch.cat([d_pre, d_post, d_res], dim=-1)
    coef = -(g_logits * gate32 * proj).sum(dim=-1, keepdim=True) * inv_r.pow(3) / stream_numel
    return g_logits, coef, h_res


def _alpha_bias_grads(g_logits, proj, inv_r, alpha, bias, n: int, needs):
    grad_alpha = _alpha_grad((g_logits * proj * inv_r).sum(dim=0), n).to(alpha.dtype) if needs[2] else None
    grad_bias = g_logits.sum(dim=0).to(bias.dtype) if needs[3] else None
    return grad_alpha, grad_bias


@fp32_maths
def mhc_pre_mappings_forward(x, phi, alpha, bias, t_max: int, eps: float):
    """The whole read of an mHC connection, Eq 14-19 then H_pre x: (u, h_pre, h_post, h_res,
    proj, inv_r), u [..., C] in x's dtype, the rest fp32; proj and inv_r for the backward.

    One op instead of seven means one gradient for the streams (mapping and aggregation terms
    written into one buffer) instead of two that autograd adds, and no stream-sized temporaries
    for the RMS and outer-product terms. (The model's torch path uses ``mhc_read_res_mix``,
    which also mixes the streams.)
    """
    lead, (n, c) = x.shape[:-2], x.shape[-2:]
    x3 = at_least_fp32(_flat(x, n, c))
    t = x3.shape[0]
    flat = x3.reshape(t, n * c)
    proj = flat @ at_least_fp32(phi)
    inv_r = torch.rsqrt(torch.linalg.vector_norm(flat, dim=-1, keepdim=True).pow(2) / (n * c) + eps)
    _, h_pre, h_post, h_res = _mappings(proj, inv_r, alpha, bias, n, t_max)
    u = _stream_sum(h_pre, x3).view(*lead, c).to(x.dtype)
    return u, h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n), proj, inv_r


@fp32_maths
def mhc_pre_mappings_backward(x, phi, alpha, bias, proj, inv_r, h_pre, h_post, g_u, g_pre, g_post, g_res,
                              t_max: int, needs):
    """(grad_x, grad_phi, grad_alpha, grad_bias), None where ``needs`` says no."""
    n, c = x.shape[-2:]
    x3 = at_least_fp32(_flat(x, n, c))
    t = x3.shape[0]
    h_pre, h_post = h_pre.reshape(t, n), h_post.reshape(t, n)
    logits = _logits(proj, inv_r, alpha, bias, n)
    gate32 = at_least_fp32(gate(alpha, n))
    g_u = at_least_fp32(g_u).reshape(t, c) if g_u is not None else _zeros((t, c), logits)
    g_h_res = g_res.reshape(t, n, n) if g_res is not None else None
    g_h_pre = _row_dot(x3, g_u)  # d loss / d H_pre: from u = H_pre x, plus any direct use
    g_logits, coef, _ = _mapping_grads(logits, proj, inv_r, gate32, h_pre, h_post, g_h_pre, g_pre, g_post,
                                       g_h_res, t_max, n * c)
    g_proj = g_logits * gate32 * inv_r
    flat = x3.reshape(t, n * c)
    grad_x = grad_phi = None
    if needs[0]:
        # One buffer, not a view (see top), for every term of the streams' gradient.
        grad_x = torch.empty(x.shape, dtype=g_logits.dtype, device=g_logits.device)
        grad_flat = grad_x.view(t, n * c)
        torch.mm(g_proj, at_least_fp32(phi).t(), out=grad_flat)
        grad_flat.addcmul_(coef, flat)
        grad_x.view(t, n, c).addcmul_(h_pre.unsqueeze(-1), g_u.unsqueeze(1))  # from u = H_pre x
        grad_x = grad_x.to(x.dtype)
    if needs[1]:
        grad_phi = _weight_grad(flat, g_proj).to(phi.dtype)
    return (grad_x, grad_phi, *_alpha_bias_grads(g_logits, proj, inv_r, alpha, bias, n, needs))


# --------------------------------------------------------------------------------------------
# The model's split of a connection (torch only): the read mixes, the write adds H_post^T y
# --------------------------------------------------------------------------------------------


@fp32_maths
def mhc_read_res_mix_forward(x, phi, alpha, bias, t_max: int, eps: float):
    """``mhc_pre_mappings_forward`` plus res_x = H_res x: (u, h_pre, h_post, h_res, res_x, proj,
    inv_r), res_x [..., n, C] fp32 for ``apply_post``.

    The write adds H_post^T y to res_x and never sees x, so the streams' whole gradient (mix,
    projection, RMS and H_pre terms) is written by the read's backward into one buffer.

    The streams it makes (res_x, and the gradient its backward returns for x) are stored
    stream-major: the logical [..., n, C] tensor lives in memory as [n, T, C]. Then every
    per-token n x n product writes whole [T, C] planes (``_rows_bmm``): the cheapest eager form
    of the mixes on CPU (docs/benchmarks.md, eager floor). Input streams stored otherwise (the
    embedding's, a pipeline stage's) are copied, in the forward and again in the backward, not
    kept twice.
    """
    lead, (n, c) = x.shape[:-2], x.shape[-2:]
    xs = at_least_fp32(_stream_major(x, n, c))  # [n, T, C]
    x_tnc = xs.transpose(0, 1)  # [T, n, C] view
    phi3 = at_least_fp32(phi).view(n, c, phi.shape[-1])
    proj = xs[0] @ phi3[0]  # sum_i x_i phi_i: n matmuls into one [T, W] (a bmm + sum is slower)
    for i in range(1, n):
        proj.addmm_(xs[i], phi3[i])
    # Per-stream norms, then their sum: one norm over (0, 2) is 2-3x slower on CPU.
    inv_r = torch.rsqrt(torch.linalg.vector_norm(xs, dim=-1).pow(2).sum(dim=0).unsqueeze(-1) / (n * c) + eps)
    _, h_pre, h_post, h_res = _mappings(proj, inv_r, alpha, bias, n, t_max)
    u = _stream_sum(h_pre, x_tnc).view(*lead, c).to(x.dtype)
    res_x, res_sm = new_stream_major(lead, n, c, xs.dtype, xs.device)
    _rows_bmm(h_res, x_tnc, res_sm)
    return u, h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n), res_x, proj, inv_r


@fp32_maths
def mhc_read_res_mix_backward(x, phi, alpha, bias, proj, inv_r, h_pre, h_post, g_u, g_pre, g_post, g_res, g_res_x,
                              t_max: int, needs):
    """(grad_x, grad_phi, grad_alpha, grad_bias), None where ``needs`` says no; grad_x is
    stored stream-major."""
    lead, (n, c) = x.shape[:-2], x.shape[-2:]
    xs = at_least_fp32(_stream_major(x, n, c))
    t, w = xs.shape[1], phi.shape[-1]
    x_tnc = xs.transpose(0, 1)
    h_pre, h_post = h_pre.reshape(t, n), h_post.reshape(t, n)
    logits = _logits(proj, inv_r, alpha, bias, n)
    gate32 = at_least_fp32(gate(alpha, n))
    g_u = at_least_fp32(g_u).reshape(t, c) if g_u is not None else xs.new_zeros(t, c)
    g_sm = _stream_major(at_least_fp32(g_res_x), n, c) if g_res_x is not None else None
    # d loss / d H_res: from res_x = H_res x, plus any direct use of h_res.
    g_h_res = g_res.reshape(t, n, n) if g_res is not None else None
    if g_sm is not None:
        from_mix = torch.bmm(g_sm.transpose(0, 1), x_tnc.transpose(1, 2))
        g_h_res = from_mix if g_h_res is None else from_mix + g_h_res
    g_logits, coef, h_res = _mapping_grads(logits, proj, inv_r, gate32, h_pre, h_post, _row_dot(x_tnc, g_u),
                                           g_pre, g_post, g_h_res, t_max, n * c)
    g_proj = (g_logits * gate32 * inv_r).expand(n, t, w)
    phi3 = at_least_fp32(phi).view(n, c, w)
    grad_x = grad_phi = None
    if needs[0]:
        grad_x, grad_sm = new_stream_major(lead, n, c, xs.dtype, xs.device)
        if g_sm is not None:
            _rows_bmm(h_res.transpose(1, 2), g_sm.transpose(0, 1), grad_sm)  # H_res^T g
            grad_sm.baddbmm_(g_proj, phi3.transpose(1, 2))  # projection term
        else:
            torch.bmm(g_proj, phi3.transpose(1, 2), out=grad_sm)
        grad_sm.addcmul_(coef.view(1, t, 1), xs)  # RMS term
        grad_sm.addcmul_(h_pre.t().unsqueeze(-1), g_u.unsqueeze(0))  # u = H_pre x
        grad_x = grad_x.to(x.dtype)
    if needs[1]:
        grad_phi = torch.bmm(xs.transpose(1, 2), g_proj).view(n * c, w).to(phi.dtype)
    return (grad_x, grad_phi, *_alpha_bias_grads(g_logits, proj, inv_r, alpha, bias, n, needs))
