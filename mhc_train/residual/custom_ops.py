"""The mHC connection ops as ``torch.library`` custom ops: ``torch.ops.mhc.<op>``.

Each op is one opaque node to ``torch.compile``: dynamo never traces its Python, a fake
implementation gives its outputs' shapes, dtypes and strides, and its autograd formula calls a
second custom op, ``<op>_backward``, so that a compiled graph's backward holds the backward as
one node too. The torch reference and the Triton kernels are two implementations of the same op:
one schema, one fake, one autograd formula for both; the Triton kernels can therefore run inside
a compiled block exactly as they run eagerly.

Backend: every op that both implement takes ``backend`` as its last argument, already resolved
by ``ops`` to ``"torch"`` or ``"triton"`` (never ``"auto"``), and runs
``backend.implementation(backend).<op>_forward`` / ``<op>_backward``: the functions of
``torch_ops`` (the reference, the specification) or the same-named ones of ``mhc_kernels``. An
argument rather than torch.library's per-device kernels (``register_kernel("cuda")``) because
the choice is not the device's: the reference runs on CUDA too, the kernels run on CPU under
Triton's interpreter. As an argument it is recorded in every traced graph, so a compiled graph
states which implementation each call runs, and a graph compiled for one never runs the other.

Conventions that the custom-op contract imposes:

- Forward ops also return what their backward needs besides inputs and outputs (``proj`` = x phi
  [T, W] and ``inv_r`` = 1/RMS [T, 1]), marked non-differentiable; ``ops`` drops them.
- Backward ops take ``needs`` (which of the op's tensor inputs want a gradient) and return the
  wanted gradients only, in input order, as a list: a schema cannot return None.
- No op returns an input or a view of one. ``apply_post`` writes a new buffer instead of adding
  into ``res_x`` in place, and the one gradient that is an incoming gradient (``apply_post``'s
  for ``res_x``) is passed on by the autograd formula, outside the ops.
- ``mhc_read_res_mix`` and ``apply_post``, the model's split of a connection on the torch
  backend (no kernel implements it), take no backend.
"""

# No ``from __future__ import annotations``: torch.library reads the schemas from the annotations.

import math
from typing import Optional

import torch
from torch import Tensor

from mhc_train.residual import torch_ops
from mhc_train.residual.backend import implementation

def _maths_dtype(*tensors: Tensor) -> torch.dtype:
    """The mappings' dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _needed(grads, needs) -> list[Tensor]:
    return [g for g, need in zip(grads, needs) if need]


def _spread(grads: list[Tensor], needs) -> tuple:
    """The backward op's list back to one entry per input (None where none was wanted)."""
    it = iter(grads)
    return tuple(next(it) if need else None for need in needs)


def _needs(ctx, k: int) -> list[bool]:
    return [bool(v) for v in ctx.needs_input_grad[:k]]


def _fake_grads(inputs, needs) -> list[Tensor]:
    return [t.new_empty(t.shape) for t, need in zip(inputs, needs) if need]


def _fake_stream_major(lead, n, c, like: Tensor, dtype: torch.dtype) -> Tensor:
    return like.new_empty_strided((*lead, n, c), torch_ops.stream_major_strides(lead, n, c), dtype=dtype)


def _fake_mappings(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor) -> tuple[Tensor, ...]:
    """(h_pre, h_post, h_res, proj, inv_r) as the forwards make them."""
    lead, (n, _) = x.shape[:-2], x.shape[-2:]
    dtype = _maths_dtype(x, phi, alpha, bias)
    t, w = math.prod(lead), n * n + 2 * n
    return (x.new_empty((*lead, n), dtype=dtype), x.new_empty((*lead, n), dtype=dtype),
            x.new_empty((*lead, n, n), dtype=dtype), x.new_empty((t, w), dtype=dtype), x.new_empty((t, 1), dtype=dtype))


# --------------------------------------------------------------------------------------------
# Sinkhorn-Knopp (Eq 9)
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("mhc::sinkhorn_knopp", mutates_args=())
def sinkhorn_knopp(logits: Tensor, t_max: int, backend: str) -> Tensor:
    return implementation(backend).sinkhorn_knopp_forward(logits, t_max)


@sinkhorn_knopp.register_fake
def _(logits, t_max, backend):
    return logits.new_empty(logits.shape, dtype=_maths_dtype(logits))


@torch.library.custom_op("mhc::sinkhorn_knopp_backward", mutates_args=())
def sinkhorn_knopp_backward(logits: Tensor, grad: Tensor, t_max: int, backend: str) -> Tensor:
    return implementation(backend).sinkhorn_knopp_backward(logits, grad, t_max)


@sinkhorn_knopp_backward.register_fake
def _(logits, grad, t_max, backend):
    return logits.new_empty(logits.shape)


def _sinkhorn_setup(ctx, inputs, output):
    logits, t_max, backend = inputs
    ctx.save_for_backward(logits)  # only the input: the backward re-runs the iterations
    ctx.t_max, ctx.backend = t_max, backend


def _sinkhorn_grad(ctx, grad):
    (logits,) = ctx.saved_tensors
    return torch.ops.mhc.sinkhorn_knopp_backward(logits, grad, ctx.t_max, ctx.backend), None, None


sinkhorn_knopp.register_autograd(_sinkhorn_grad, setup_context=_sinkhorn_setup)


# --------------------------------------------------------------------------------------------
# Mappings (Eq 14-19), and the fused read: mappings then H_pre x
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("mhc::mhc_mappings", mutates_args=())
def mhc_mappings(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, t_max: int, eps: float,
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(h_pre, h_post, h_res, proj, inv_r)."""
    return implementation(backend).mhc_mappings_forward(x, phi, alpha, bias, t_max, eps)


@mhc_mappings.register_fake
def _(x, phi, alpha, bias, t_max, eps, backend):
    return _fake_mappings(x, phi, alpha, bias)


@torch.library.custom_op("mhc::mhc_mappings_backward", mutates_args=())
def mhc_mappings_backward(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, proj: Tensor, inv_r: Tensor,
                          h_pre: Tensor, h_post: Tensor, g_pre: Optional[Tensor], g_post: Optional[Tensor],
                          g_res: Optional[Tensor], t_max: int, needs: list[bool], backend: str) -> list[Tensor]:
    grads = implementation(backend).mhc_mappings_backward(x, phi, alpha, bias, proj, inv_r, h_pre, h_post,
                                                          g_pre, g_post, g_res, t_max, needs)
    return _needed(grads, needs)


@mhc_mappings_backward.register_fake
def _(x, phi, alpha, bias, proj, inv_r, h_pre, h_post, g_pre, g_post, g_res, t_max, needs, backend):
    return _fake_grads((x, phi, alpha, bias), needs)


@torch.library.custom_op("mhc::mhc_pre_mappings", mutates_args=())
def mhc_pre_mappings(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, t_max: int, eps: float,
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(u, h_pre, h_post, h_res, proj, inv_r)."""
    return implementation(backend).mhc_pre_mappings_forward(x, phi, alpha, bias, t_max, eps)


@mhc_pre_mappings.register_fake
def _(x, phi, alpha, bias, t_max, eps, backend):
    return (x.new_empty((*x.shape[:-2], x.shape[-1])), *_fake_mappings(x, phi, alpha, bias))


@torch.library.custom_op("mhc::mhc_pre_mappings_backward", mutates_args=())
def mhc_pre_mappings_backward(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, proj: Tensor, inv_r: Tensor,
                              h_pre: Tensor, h_post: Tensor, g_u: Optional[Tensor], g_pre: Optional[Tensor],
                              g_post: Optional[Tensor], g_res: Optional[Tensor], t_max: int, needs: list[bool],
                              backend: str) -> list[Tensor]:
    grads = implementation(backend).mhc_pre_mappings_backward(x, phi, alpha, bias, proj, inv_r, h_pre, h_post,
                                                              g_u, g_pre, g_post, g_res, t_max, needs)
    return _needed(grads, needs)


@mhc_pre_mappings_backward.register_fake
def _(x, phi, alpha, bias, proj, inv_r, h_pre, h_post, g_u, g_pre, g_post, g_res, t_max, needs, backend):
    return _fake_grads((x, phi, alpha, bias), needs)


def _save_mappings(ctx, inputs, h_pre, h_post, proj, inv_r):
    """What the three mapping ops keep for their backward: the inputs, H_pre, H_post and the
    two extras (never the logits: the backwards recompute them, bitwise, from proj and inv_r)."""
    x, phi, alpha, bias, t_max = inputs[:5]
    ctx.mark_non_differentiable(proj, inv_r)
    ctx.set_materialize_grads(False)  # unused outputs (often h_pre, h_res) cost nothing
    ctx.save_for_backward(x, phi, alpha, bias, proj, inv_r, h_pre, h_post)
    ctx.t_max = t_max


def _mappings_setup(ctx, inputs, output):
    h_pre, h_post, _, proj, inv_r = output
    _save_mappings(ctx, inputs, h_pre, h_post, proj, inv_r)
    ctx.backend = inputs[-1]


def _pre_mappings_setup(ctx, inputs, output):
    _, h_pre, h_post, _, proj, inv_r = output
    _save_mappings(ctx, inputs, h_pre, h_post, proj, inv_r)
    ctx.backend = inputs[-1]


def _mappings_grad(ctx, g_pre, g_post, g_res, _proj, _inv_r):
    needs = _needs(ctx, 4)
    if not any(needs):
        return (None,) * 7
    grads = torch.ops.mhc.mhc_mappings_backward(*ctx.saved_tensors, g_pre, g_post, g_res, ctx.t_max, needs,
                                                ctx.backend)
    return (*_spread(grads, needs), None, None, None)


def _pre_mappings_grad(ctx, g_u, g_pre, g_post, g_res, _proj, _inv_r):
    needs = _needs(ctx, 4)
    if not any(needs):
        return (None,) * 7
    grads = torch.ops.mhc.mhc_pre_mappings_backward(*ctx.saved_tensors, g_u, g_pre, g_post, g_res, ctx.t_max,
                                                    needs, ctx.backend)
    return (*_spread(grads, needs), None, None, None)


mhc_mappings.register_autograd(_mappings_grad, setup_context=_mappings_setup)
mhc_pre_mappings.register_autograd(_pre_mappings_grad, setup_context=_pre_mappings_setup)


# --------------------------------------------------------------------------------------------
# Applying the mappings
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("mhc::apply_pre", mutates_args=())
def apply_pre(x: Tensor, h_pre: Tensor, backend: str) -> Tensor:
    return implementation(backend).apply_pre_forward(x, h_pre)


@apply_pre.register_fake
def _(x, h_pre, backend):
    return x.new_empty((*x.shape[:-2], x.shape[-1]))


@torch.library.custom_op("mhc::apply_pre_backward", mutates_args=())
def apply_pre_backward(x: Tensor, h_pre: Tensor, grad: Tensor, needs: list[bool], backend: str) -> list[Tensor]:
    return _needed(implementation(backend).apply_pre_backward(x, h_pre, grad, needs), needs)


@apply_pre_backward.register_fake
def _(x, h_pre, grad, needs, backend):
    return _fake_grads((x, h_pre), needs)


def _apply_pre_setup(ctx, inputs, output):
    x, h_pre, backend = inputs
    ctx.save_for_backward(x, h_pre)
    ctx.backend = backend


def _apply_pre_grad(ctx, grad):
    needs = _needs(ctx, 2)
    grads = torch.ops.mhc.apply_pre_backward(*ctx.saved_tensors, grad, needs, ctx.backend)
    return (*_spread(grads, needs), None)


apply_pre.register_autograd(_apply_pre_grad, setup_context=_apply_pre_setup)


@torch.library.custom_op("mhc::apply_post_res", mutates_args=())
def apply_post_res(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, backend: str) -> Tensor:
    return implementation(backend).apply_post_res_forward(x, y, h_post, h_res)


@apply_post_res.register_fake
def _(x, y, h_post, h_res, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("mhc::apply_post_res_backward", mutates_args=())
def apply_post_res_backward(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, grad: Tensor, needs: list[bool],
                            backend: str) -> list[Tensor]:
    return _needed(implementation(backend).apply_post_res_backward(x, y, h_post, h_res, grad, needs), needs)


@apply_post_res_backward.register_fake
def _(x, y, h_post, h_res, grad, needs, backend):
    return _fake_grads((x, y, h_post, h_res), needs)


def _apply_post_res_setup(ctx, inputs, output):
    *tensors, backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.backend = backend


def _apply_post_res_grad(ctx, grad):
    needs = _needs(ctx, 4)
    grads = torch.ops.mhc.apply_post_res_backward(*ctx.saved_tensors, grad, needs, ctx.backend)
    return (*_spread(grads, needs), None)


apply_post_res.register_autograd(_apply_post_res_grad, setup_context=_apply_post_res_setup)


# --------------------------------------------------------------------------------------------
# The torch backend's split of a connection: the read mixes the streams, the write adds
# H_post^T y (torch_ops.mhc_read_res_mix_forward says why)
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("mhc::mhc_read_res_mix", mutates_args=())
def mhc_read_res_mix(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, t_max: int,
                     eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(u, h_pre, h_post, h_res, res_x, proj, inv_r); res_x stored stream-major."""
    return torch_ops.mhc_read_res_mix_forward(x, phi, alpha, bias, t_max, eps)


@mhc_read_res_mix.register_fake
def _(x, phi, alpha, bias, t_max, eps):
    lead, (n, c) = x.shape[:-2], x.shape[-2:]
    h_pre, h_post, h_res, proj, inv_r = _fake_mappings(x, phi, alpha, bias)
    res_x = _fake_stream_major(lead, n, c, x, _maths_dtype(x))
    return x.new_empty((*lead, c)), h_pre, h_post, h_res, res_x, proj, inv_r


@torch.library.custom_op("mhc::mhc_read_res_mix_backward", mutates_args=())
def mhc_read_res_mix_backward(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, proj: Tensor, inv_r: Tensor,
                              h_pre: Tensor, h_post: Tensor, g_u: Optional[Tensor], g_pre: Optional[Tensor],
                              g_post: Optional[Tensor], g_res: Optional[Tensor], g_res_x: Optional[Tensor],
                              t_max: int, needs: list[bool]) -> list[Tensor]:
    """The gradients wanted; x's is stored stream-major."""
    grads = torch_ops.mhc_read_res_mix_backward(x, phi, alpha, bias, proj, inv_r, h_pre, h_post,
                                                g_u, g_pre, g_post, g_res, g_res_x, t_max, needs)
    return _needed(grads, needs)


@mhc_read_res_mix_backward.register_fake
def _(x, phi, alpha, bias, proj, inv_r, h_pre, h_post, g_u, g_pre, g_post, g_res, g_res_x, t_max, needs):
    grads = _fake_grads((x, phi, alpha, bias), needs)
    if needs[0]:
        lead, (n, c) = x.shape[:-2], x.shape[-2:]
        grads[0] = _fake_stream_major(lead, n, c, x, x.dtype)
    return grads


def _read_res_mix_setup(ctx, inputs, output):
    _, h_pre, h_post, _, _, proj, inv_r = output
    _save_mappings(ctx, inputs, h_pre, h_post, proj, inv_r)


def _read_res_mix_grad(ctx, g_u, g_pre, g_post, g_res, g_res_x, _proj, _inv_r):
    needs = _needs(ctx, 4)
    if not any(needs):
        return (None,) * 6
    grads = torch.ops.mhc.mhc_read_res_mix_backward(*ctx.saved_tensors, g_u, g_pre, g_post, g_res, g_res_x,
                                                    ctx.t_max, needs)
    return (*_spread(grads, needs), None, None)


mhc_read_res_mix.register_autograd(_read_res_mix_grad, setup_context=_read_res_mix_setup)


@torch.library.custom_op("mhc::apply_post", mutates_args=())
def apply_post(res_x: Tensor, y: Tensor, h_post: Tensor, out_dtype: torch.dtype) -> Tensor:
    """res_x + h_post^T y in ``out_dtype``, stored stream-major (a new buffer, see the top)."""
    return torch_ops.apply_post_forward(res_x, y, h_post, out_dtype)


@apply_post.register_fake
def _(res_x, y, h_post, out_dtype):
    lead, (n, c) = res_x.shape[:-2], res_x.shape[-2:]
    return _fake_stream_major(lead, n, c, res_x, out_dtype)


@torch.library.custom_op("mhc::apply_post_backward", mutates_args=())
def apply_post_backward(y: Tensor, h_post: Tensor, grad: Tensor, needs: list[bool]) -> list[Tensor]:
    """(grad_y, grad_h_post) as wanted; ``grad`` best stored stream-major (no copy then)."""
    return _needed(torch_ops.apply_post_backward(y, h_post, grad, needs), needs)


@apply_post_backward.register_fake
def _(y, h_post, grad, needs):
    return _fake_grads((y, h_post), needs)


def _apply_post_setup(ctx, inputs, output):
    res_x, y, h_post, _ = inputs
    ctx.save_for_backward(y, h_post)
    ctx.res_x_dtype = res_x.dtype


def _apply_post_grad(ctx, grad):
    # res_x's gradient is the incoming one: made stream-major here (a copy only for a gradient
    # stored otherwise: the last write's arrives with a stride-0 stream axis from the stream sum
    # before the head), so that the read's backward and the op below both take it without one.
    g_sm = torch_ops.as_stream_major(torch_ops.at_least_fp32(grad))
    needs = _needs(ctx, 3)
    grad_y = grad_post = None
    if needs[1] or needs[2]:
        grads = torch.ops.mhc.apply_post_backward(*ctx.saved_tensors, g_sm, needs[1:])
        grad_y, grad_post = _spread(grads, needs[1:])
    grad_res_x = g_sm.to(ctx.res_x_dtype) if needs[0] else None
    return grad_res_x, grad_y, grad_post, None


apply_post.register_autograd(_apply_post_grad, setup_context=_apply_post_setup)


OPS = ("sinkhorn_knopp", "mhc_mappings", "mhc_pre_mappings", "apply_pre", "apply_post_res",
       "mhc_read_res_mix", "apply_post")
"""The forward ops (each with ``<op>_backward``); the first five on both backends."""
