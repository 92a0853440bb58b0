"""Torch implementations of the mHC ops with hand-written backwards.

Plain autograd of the stream ops makes several passes over the [..., n, C] streams per op
(broadcast products, their backwards, the sum of partial gradients); these functions do the
fewest: batched matmuls on contiguous operands, and for the mappings one matmul plus one
fused update for the RMS term. They are checked against the plain formulas by gradcheck
(tests/test_ops.py). The Triton kernels of mhc_kernels implement the same contracts.

CPU notes that shaped the code (measured inside a training step, 2048 tokens, n = 4, C = 256):

- A fresh stream-sized temporary costs more than most products over it, so none is made that
  is not an output; the write adds into the read's H_res x instead of allocating its output.
- bmm operands must have contiguous (or transposed) batch items: anything else, such as the
  stride-0 stream axis of the last write's gradient, falls back to one small matmul per token.
- bmm's per-token matrix-vector products (``[T, n, C] x [T, C, 1]``) are slow; ``_row_dot``
  multiplies and sums blocks of tokens through one cache-sized temporary, 2x faster.
- Stream gradients are returned as fresh tensors, not views: autograd can add another gradient
  of the same tensor into such a tensor in place instead of allocating a third one.
- The model's read (``ReadResMix``) and write (``ApplyPost``) keep the streams stored
  stream-major ([n, T, C] memory behind the logical [..., n, C] tensor): a per-token n x n mix
  is then n bmm calls that each write a contiguous [T, C] plane, ~2x faster than one bmm of
  n x n matrices whose output rows interleave (2-3% of the whole step).
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

from mhc_train.residual.sinkhorn import sinkhorn_forward, sinkhorn_recompute


def fp32_maths(fn):
    """Run a Function's forward or backward with autocast off: the mappings' maths is fp32 for
    any activation dtype (autocast would run its matmuls in bf16, and refuses the in-place
    products of an fp32 buffer with bf16 operands)."""

    @functools.wraps(fn)
    def run(ctx, *args):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(ctx, *args)

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


class ApplyPre(torch.autograd.Function):
    """u[t] = sum_i h[t, i] x[t, i]  (x [T, n, C], h [T, n], fp32 maths)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[-2:]
        ctx.save_for_backward(x, h)
        return _stream_sum(at_least_fp32(h), at_least_fp32(_flat(x, n, c))).reshape(*x.shape[:-2], c).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, h = ctx.saved_tensors
        n, c = x.shape[-2:]
        g32 = at_least_fp32(g)
        grad_x = grad_h = None
        if ctx.needs_input_grad[0]:
            grad_x = (at_least_fp32(h).unsqueeze(-1) * g32.unsqueeze(-2)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_h = _row_dot(at_least_fp32(_flat(x, n, c)), g32).reshape(h.shape).to(h.dtype)
        return grad_x, grad_h


class ApplyPostRes(torch.autograd.Function):
    """out[t] = h_res[t] @ x[t] + h_post[t]^T y[t].

    Outer products are broadcast multiplies, not K=1 batched matmuls: on CPU those (and
    baddbmm onto a broadcast input) fall back to one small matmul per token and run 10x slower.
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
        # The gradient of the last write arrives expanded (stride 0 over the streams, from the
        # stream sum before the head): bmm would fall back to one matmul per token.
        g3 = _flat(at_least_fp32(g), n, c).contiguous()
        grad_x = grad_y = grad_post = grad_res = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty(x.shape, dtype=g3.dtype, device=g3.device)  # not a view: see top
            torch.bmm(at_least_fp32(h_res.reshape(-1, n, n)).transpose(1, 2), g3, out=_flat(grad_x, n, c))
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_y = _stream_sum(at_least_fp32(h_post), g3).reshape(y.shape).to(y.dtype)
        if ctx.needs_input_grad[2]:
            grad_post = _row_dot(g3, at_least_fp32(y)).reshape(h_post.shape).to(h_post.dtype)
        if ctx.needs_input_grad[3]:
            x_t = at_least_fp32(_flat(x, n, c)).transpose(1, 2)
            grad_res = torch.bmm(g3, x_t).reshape(h_res.shape).to(h_res.dtype)
        return grad_x, grad_y, grad_post, grad_res


class ApplyPost(torch.autograd.Function):
    """out = res_x + h_post^T y: the write of a connection whose read already mixed the streams.

    res_x [..., n, C] (= H_res x, fp32, from ``ReadResMix``), y [..., C],
    h_post [..., n] -> [..., n, C] in ``out_dtype``. When that is fp32 the sum is written into
    res_x (a buffer nothing else uses) instead of a new stream-sized tensor. The gradient of
    res_x is the incoming gradient itself; H_res and x get theirs in the read's backward, which
    thereby writes the streams' whole gradient into one buffer.
    """

    @staticmethod
    def forward(ctx, res_x, y, h_post, out_dtype: torch.dtype):
        h3 = at_least_fp32(h_post).unsqueeze(-1)
        y3 = at_least_fp32(y).unsqueeze(-2)
        ctx.save_for_backward(y, h_post)
        ctx.res_x_dtype = res_x.dtype
        if out_dtype != res_x.dtype:
            return torch.addcmul(res_x, h3, y3).to(out_dtype)
        # torch.compile: dynamo accepts mark_dirty only when it sees the dirty input returned, and
        # only with an autograd graph to record (not in evaluation, which needs no marking).
        if any(ctx.needs_input_grad):
            ctx.mark_dirty(res_x)
        res_x.addcmul_(h3, y3)
        return res_x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        y, h_post = ctx.saved_tensors
        lead, (n, c) = g.shape[:-2], g.shape[-2:]
        # Stream-major like res_x (a copy only for a gradient stored otherwise: the last write's
        # arrives with a stride-0 stream axis from the stream sum before the head).
        g_sm = _stream_major(at_least_fp32(g), n, c)
        g_tnc = g_sm.transpose(0, 1)
        grad_y = grad_post = None
        if ctx.needs_input_grad[1]:
            grad_y = _stream_sum(at_least_fp32(h_post).reshape(-1, n), g_tnc).reshape(y.shape).to(y.dtype)
        if ctx.needs_input_grad[2]:
            grad_post = _row_dot(g_tnc, at_least_fp32(y)).reshape(h_post.shape).to(h_post.dtype)
        grad_res_x = g_sm.view(n, *lead, c).movedim(0, -2).to(ctx.res_x_dtype)
        return grad_res_x, grad_y, grad_post, None


class MappingLogits(torch.autograd.Function):
    """H~ = (1/r) * gate * (x phi) + bias, r = sqrt(mean(x^2) + eps) over the nC vector (Eq 14-16).

    x [T, nC] (any float dtype, maths in fp32), phi [nC, W], gate [W] (alpha spread over the
    pre | post | res columns), bias [W] -> logits [T, W] fp32. Saves x, phi and two [T, W] /
    [T, 1] fp32 tensors; the backward is one matmul for x plus one fused RMS correction.
    """

    @staticmethod
    @fp32_maths
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
    @fp32_maths
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
            grad_phi = _weight_grad(x32, g_proj).to(phi.dtype)
        if ctx.needs_input_grad[2]:
            grad_gate = (g * proj * inv_r).sum(dim=0).to(gate.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = g.sum(dim=0).to(ctx.bias_dtype)
        return grad_x, grad_phi, grad_gate, grad_bias, None


def _weight_grad(flat: torch.Tensor, g_proj: torch.Tensor) -> torch.Tensor:
    """phi's gradient flat^T @ g_proj ([nC, T] x [T, W]), computed as (g_proj^T @ flat)^T: the
    same sums, in the orientation MKL runs faster for W = n^2 + 2n columns (measured on CPU).
    Returned contiguous like phi (nC x W floats): autograd warns about, and copies, a gradient
    whose strides differ from its parameter's."""
    return (g_proj.t() @ flat).t().contiguous()


class PreMappings(torch.autograd.Function):
    """The whole read of an mHC connection, Eq 14-19 then H_pre x, in one node.

    x [..., n, C], phi [nC, W], gate [W], bias [W] -> u [..., C] (x's dtype), h_pre, h_post
    [..., n], h_res [..., n, n] (fp32). One node instead of seven means one gradient for the
    streams (mapping and aggregation terms written into one buffer) instead of two that autograd
    adds, and no stream-sized temporaries for the RMS and outer-product terms. (The model's
    torch path uses ``ReadResMix``, which also mixes the streams.)
    """

    @staticmethod
    @fp32_maths
    def forward(ctx, x, phi, gate, bias, t_max: int, eps: float):
        lead, (n, c) = x.shape[:-2], x.shape[-2:]
        x3 = at_least_fp32(_flat(x, n, c))
        t = x3.shape[0]
        flat = x3.reshape(t, n * c)
        proj = flat @ at_least_fp32(phi)
        inv_r = torch.rsqrt(torch.linalg.vector_norm(flat, dim=-1, keepdim=True).pow(2) / (n * c) + eps)
        logits, h_pre, h_post, h_res = _mappings(proj, inv_r, gate, bias, n, t_max)
        u = _stream_sum(h_pre, x3).view(*lead, c).to(x.dtype)
        ctx.save_for_backward(x, phi, gate, proj, inv_r, logits, h_pre, h_post)
        ctx.t_max, ctx.bias_dtype, ctx.stream_numel = t_max, bias.dtype, n * c
        ctx.set_materialize_grads(False)  # unused outputs (often h_pre, h_res) cost nothing
        return u, h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n)

    @staticmethod
    @once_differentiable
    @fp32_maths
    def backward(ctx, g_u, g_pre, g_post, g_res):
        x, phi, gate, proj, inv_r, logits, h_pre, h_post = ctx.saved_tensors
        n, c = x.shape[-2:]
        x3 = at_least_fp32(_flat(x, n, c))
        t = x3.shape[0]
        zeros = lambda shape: torch.zeros(shape, dtype=logits.dtype, device=logits.device)  # noqa: E731
        g_u = at_least_fp32(g_u).reshape(t, c) if g_u is not None else zeros((t, c))
        g_h_res = g_res.reshape(t, n, n) if g_res is not None else None
        g_h_pre = _row_dot(x3, g_u)  # d loss / d H_pre: from u = H_pre x, plus any direct use
        g_logits, coef, _ = _mapping_grads(ctx, logits, proj, inv_r, gate, h_pre, h_post, g_h_pre, g_pre, g_post, g_h_res)
        g_proj = g_logits * at_least_fp32(gate) * inv_r
        flat = x3.reshape(t, n * c)
        grad_x = grad_phi = None
        if ctx.needs_input_grad[0]:
            # One buffer, not a view (see top), for every term of the streams' gradient.
            grad_x = torch.empty(x.shape, dtype=g_logits.dtype, device=g_logits.device)
            grad_flat = grad_x.view(t, n * c)
            torch.mm(g_proj, at_least_fp32(phi).t(), out=grad_flat)
            grad_flat.addcmul_(coef, flat)
            grad_x.view(t, n, c).addcmul_(h_pre.unsqueeze(-1), g_u.unsqueeze(1))  # from u = H_pre x
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_phi = _weight_grad(flat, g_proj).to(phi.dtype)
        return (grad_x, grad_phi, *_gate_bias_grads(ctx, g_logits, proj, inv_r, gate), None, None)


def _mappings(proj, inv_r, gate, bias, n: int, t_max: int):
    """Eq 16-19 from the projection [T, W] and 1/RMS [T, 1]: (logits, H_pre, H_post, H_res)."""
    logits = torch.addcmul(at_least_fp32(bias), inv_r * proj, at_least_fp32(gate))
    h_pre = torch.sigmoid(logits[:, :n])
    h_post = 2.0 * torch.sigmoid(logits[:, n : 2 * n])
    h_res = sinkhorn_forward(logits[:, 2 * n :].reshape(-1, n, n), t_max)
    return logits, h_pre, h_post, h_res


def _mapping_grads(ctx, logits, proj, inv_r, gate, h_pre, h_post, g_h_pre, g_pre, g_post, g_h_res):
    """d loss / d logits [T, W] through sigmoid, 2 sigmoid and Sinkhorn (recomputed); the RMS
    term's per-token coefficient [T, 1] (d loss / d x gets coef * x, from d inv_r / d x =
    -inv_r^3 x / (nC) summed against g_logits * gate * proj); the recomputed H_res [T, n, n]
    (None when H_res got no gradient). ``g_*`` None: that output was unused."""
    t, n = h_pre.shape
    zeros = lambda shape: torch.zeros(shape, dtype=logits.dtype, device=logits.device)  # noqa: E731
    if g_pre is not None:
        g_h_pre = g_h_pre + g_pre.reshape(t, n)
    d_pre = g_h_pre * h_pre * (1.0 - h_pre)  # sigmoid'
    d_post = (g_post.reshape(t, n) * h_post * (1.0 - 0.5 * h_post)) if g_post is not None else zeros((t, n))
    h_res = None
    if g_h_res is not None:
        h_res, sinkhorn_vjp = sinkhorn_recompute(logits[:, 2 * n :].reshape(t, n, n), ctx.t_max)
        d_res = sinkhorn_vjp(g_h_res).reshape(t, n * n)
    else:
        d_res = zeros((t, n * n))
    g_logits = torch.cat([d_pre, d_post, d_res], dim=-1)
    coef = -(g_logits * at_least_fp32(gate) * proj).sum(dim=-1, keepdim=True) * inv_r.pow(3) / ctx.stream_numel
    return g_logits, coef, h_res


def _gate_bias_grads(ctx, g_logits, proj, inv_r, gate):
    grad_gate = (g_logits * proj * inv_r).sum(dim=0).to(gate.dtype) if ctx.needs_input_grad[2] else None
    grad_bias = g_logits.sum(dim=0).to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
    return grad_gate, grad_bias


def _stream_major(x: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """``[..., n, C] -> [n, T, C]`` contiguous: a view when x is stored stream-major (what
    ``ReadResMix`` and ``ApplyPost`` produce), else a copy."""
    sm = x.movedim(-2, 0).reshape(n, -1, c)
    return sm if sm.is_contiguous() else sm.contiguous()


def _new_stream_major(lead, n: int, c: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh ``[*lead, n, C]`` tensor stored stream-major (not a view: ``ApplyPost`` writes
    into it in place, which autograd forbids on a view made inside a custom Function), and its
    ``[n, T, C]`` view."""
    strides = torch.empty((n, *lead, c), device="meta").movedim(0, -2).stride()
    out = torch.empty_strided((*lead, n, c), strides, dtype=like.dtype, device=like.device)
    return out, out.movedim(-2, 0).reshape(n, -1, c)


def _rows_bmm(mats: torch.Tensor, v_tnc: torch.Tensor, out_sm: torch.Tensor) -> None:
    """out_sm[i] = per-token (row i of mats [T, n, n]) @ v [T, n, C]: each row is one M = 1 bmm
    writing a contiguous [T, C] plane: in a CPU training step (2048 tokens, C = 256) the four
    take 1.1-1.3 ms, one bmm of 4 x 4 matrices (whose output rows interleave) 2-3 ms."""
    t, n, c = v_tnc.shape
    for i in range(n):
        torch.bmm(mats[:, i : i + 1].contiguous(), v_tnc, out=out_sm[i].view(t, 1, c))


class ReadResMix(torch.autograd.Function):
    """The read of the torch path: ``PreMappings`` plus res_x = H_res x for ``ApplyPost``.

    x [..., n, C], phi [nC, W], gate [W], bias [W] -> (u, h_pre, h_post, h_res, res_x), res_x
    [..., n, C] fp32. The write adds H_post^T y into res_x and never sees x, so the streams'
    whole gradient (mix, projection, RMS and H_pre terms) is written by this node into one buffer.

    The streams it makes (res_x, and the gradient it returns for x) are stored stream-major: the
    logical [..., n, C] tensor lives in memory as [n, T, C]. Then every per-token n x n product
    writes whole [T, C] planes (``_rows_bmm``): the cheapest eager form of the mixes on CPU
    (docs/benchmarks.md, eager floor). Input streams stored otherwise (the embedding's, a
    pipeline stage's) are copied, in the forward and again in the backward, not kept twice.
    """

    @staticmethod
    @fp32_maths
    def forward(ctx, x, phi, gate, bias, t_max: int, eps: float):
        lead, (n, c) = x.shape[:-2], x.shape[-2:]
        xs = at_least_fp32(_stream_major(x, n, c))  # [n, T, C]
        x_tnc = xs.transpose(0, 1)  # [T, n, C] view
        phi3 = at_least_fp32(phi).view(n, c, phi.shape[-1])
        proj = xs[0] @ phi3[0]  # sum_i x_i phi_i: n matmuls into one [T, W] (a bmm + sum is slower)
        for i in range(1, n):
            proj.addmm_(xs[i], phi3[i])
        # Per-stream norms, then their sum: one norm over (0, 2) is 2-3x slower on CPU.
        inv_r = torch.rsqrt(torch.linalg.vector_norm(xs, dim=-1).pow(2).sum(dim=0).unsqueeze(-1) / (n * c) + eps)
        logits, h_pre, h_post, h_res = _mappings(proj, inv_r, gate, bias, n, t_max)
        u = _stream_sum(h_pre, x_tnc).view(*lead, c).to(x.dtype)
        res_x, res_sm = _new_stream_major(lead, n, c, xs)
        _rows_bmm(h_res, x_tnc, res_sm)
        # x itself, not x_sm: where x_sm is a copy (streams stored otherwise) the caller keeps x
        # alive anyway, and the backward rebuilds the copy as a temporary.
        ctx.save_for_backward(x, phi, gate, proj, inv_r, logits, h_pre, h_post)
        ctx.t_max, ctx.bias_dtype, ctx.lead, ctx.x_dtype, ctx.stream_numel = t_max, bias.dtype, lead, x.dtype, n * c
        ctx.set_materialize_grads(False)  # unused outputs (often h_pre, h_res) cost nothing
        return u, h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n), res_x

    @staticmethod
    @once_differentiable
    @fp32_maths
    def backward(ctx, g_u, g_pre, g_post, g_res, g_res_x):
        x, phi, gate, proj, inv_r, logits, h_pre, h_post = ctx.saved_tensors
        n, c = x.shape[-2:]
        xs = at_least_fp32(_stream_major(x, n, c))
        t, w = xs.shape[1], phi.shape[-1]
        x_tnc = xs.transpose(0, 1)
        g_u = at_least_fp32(g_u).reshape(t, c) if g_u is not None else xs.new_zeros(t, c)
        g_sm = _stream_major(at_least_fp32(g_res_x), n, c) if g_res_x is not None else None
        # d loss / d H_res: from res_x = H_res x, plus any direct use of h_res.
        g_h_res = g_res.reshape(t, n, n) if g_res is not None else None
        if g_sm is not None:
            from_mix = torch.bmm(g_sm.transpose(0, 1), x_tnc.transpose(1, 2))
            g_h_res = from_mix if g_h_res is None else from_mix + g_h_res
        g_logits, coef, h_res = _mapping_grads(ctx, logits, proj, inv_r, gate, h_pre, h_post,
                                               _row_dot(x_tnc, g_u), g_pre, g_post, g_h_res)
        g_proj = (g_logits * at_least_fp32(gate) * inv_r).expand(n, t, w)
        phi3 = at_least_fp32(phi).view(n, c, w)
        grad_x = grad_phi = None
        if ctx.needs_input_grad[0]:
            grad_x, grad_sm = _new_stream_major(ctx.lead, n, c, xs)
            if g_sm is not None:
                _rows_bmm(h_res.transpose(1, 2), g_sm.transpose(0, 1), grad_sm)  # H_res^T g
                grad_sm.baddbmm_(g_proj, phi3.transpose(1, 2))  # projection term
            else:
                torch.bmm(g_proj, phi3.transpose(1, 2), out=grad_sm)
            grad_sm.addcmul_(coef.view(1, t, 1), xs)  # RMS term
            grad_sm.addcmul_(h_pre.t().unsqueeze(-1), g_u.unsqueeze(0))  # u = H_pre x
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_phi = torch.bmm(xs.transpose(1, 2), g_proj).view(n * c, w).to(phi.dtype)
        return (grad_x, grad_phi, *_gate_bias_grads(ctx, g_logits, proj, inv_r, gate), None, None)
