"""The functional mHC ops: the public, stable API that the Triton kernels implement.

Shapes: x ``[..., n, C]`` (stream axis next to features), h_pre/h_post ``[..., n]``,
h_res ``[..., n, n]``. Convention (paper Eq 3): output stream i = sum_j h_res[i, j] x_j, so
row sums are the forward gain and column sums the backward gain.

Every op takes ``backend``: ``"torch"`` (the reference), ``"triton"`` and ``"auto"``
(triton on CUDA, torch elsewhere). The mapping maths always runs in fp32, whatever the
activation dtype: bf16 mappings made Sinkhorn's row-sum error 300x worse elsewhere.

Each function checks its inputs, resolves the backend and calls its ``torch.ops.mhc`` custom op
(``custom_ops``), which runs that backend's implementation; under ``torch.compile`` the checks
are traced and the op is one opaque node, whichever backend it runs.
"""

from __future__ import annotations

import torch

from mhc_train.residual import custom_ops  # noqa: F401  (defines torch.ops.mhc.*)
from mhc_train.residual.backend import BACKENDS, resolve_backend  # noqa: F401  (re-exported)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_float(name: str, t: torch.Tensor) -> None:
    _check(t.is_floating_point(), f"{name} must be a floating tensor, got dtype {t.dtype}")


# --------------------------------------------------------------------------------------------
# Sinkhorn-Knopp (Eq 9)
# --------------------------------------------------------------------------------------------


def sinkhorn_knopp(logits: torch.Tensor, t_max: int, backend: str = "torch") -> torch.Tensor:
    """``[..., n, n]`` logits -> doubly stochastic ``[..., n, n]`` (fp32).

    M0 = exp(logits), then ``t_max`` times: normalise columns to sum 1, then rows to sum 1.
    Rows therefore sum to 1 exactly; columns converge with t_max.
    """
    _check_float("logits", logits)
    _check(logits.dim() >= 2 and logits.shape[-1] == logits.shape[-2],
           f"logits must have shape [..., n, n], got {tuple(logits.shape)}")
    _check(int(t_max) >= 1, f"t_max must be >= 1, got {t_max}")
    return torch.ops.mhc.sinkhorn_knopp(logits, int(t_max), resolve_backend(backend, logits.device))


# --------------------------------------------------------------------------------------------
# Mappings (Eq 14-19)
# --------------------------------------------------------------------------------------------


def mapping_width(n: int) -> int:
    """Columns of phi: pre (n) | post (n) | res (n*n, row-major)."""
    return n * n + 2 * n


def _check_mapping_inputs(x, phi, alpha, bias) -> tuple[int, int]:
    _check_float("x", x)
    _check(x.dim() >= 2, f"x must have shape [..., n, C], got {tuple(x.shape)}")
    n, c = x.shape[-2], x.shape[-1]
    width = mapping_width(n)
    _check(tuple(phi.shape) == (n * c, width),
           f"phi must have shape [n*C, n*n+2n] = [{n * c}, {width}], got {tuple(phi.shape)}")
    _check(tuple(alpha.shape) == (3,), f"alpha must have shape [3], got {tuple(alpha.shape)}")
    _check(tuple(bias.shape) == (width,), f"bias must have shape [{width}], got {tuple(bias.shape)}")
    return n, c


def mhc_mappings(
    x: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    t_max: int,
    eps: float = 0.0,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic mHC coefficients of each token (paper Eq 14-19), all returned in fp32.

    x ``[..., n, C]`` is flattened stream-major to nC; phi ``[n*C, n*n + 2n]``;
    alpha ``[3]`` = (pre, post, res); bias ``[n*n + 2n]``.
    r = RMS of the raw nC vector (``eps`` is added under the root; the paper prints none),
    applied after the matmul: H~ = (1/r) * alpha * (x phi) + bias.
    Returns h_pre = sigmoid ``[..., n]``, h_post = 2 sigmoid ``[..., n]``,
    h_res = Sinkhorn-Knopp(H~_res) ``[..., n, n]``.
    """
    _check_mapping_inputs(x, phi, alpha, bias)
    h_pre, h_post, h_res, _, _ = torch.ops.mhc.mhc_mappings(x, phi, alpha, bias, int(t_max), float(eps),
                                                            resolve_backend(backend, x.device))
    return h_pre, h_post, h_res


def mhc_pre_mappings(
    x: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    t_max: int,
    eps: float = 0.0,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mhc_mappings`` followed by ``apply_pre``: returns ``(u, h_pre, h_post, h_res)``.

    The Triton backend does it in one fused kernel that reads x once for the mappings and once
    more (from cache) for H_pre x; the torch backend runs it as one autograd node with a
    hand-written backward (``torch_ops.mhc_pre_mappings_backward``).
    """
    _check_mapping_inputs(x, phi, alpha, bias)
    backend = resolve_backend(backend, x.device)
    if backend == "torch":  # the kernels' own check says the same
        _check(int(t_max) >= 1, f"t_max must be >= 1, got {t_max}")
    u, h_pre, h_post, h_res, _, _ = torch.ops.mhc.mhc_pre_mappings(x, phi, alpha, bias, int(t_max), float(eps), backend)
    return u, h_pre, h_post, h_res


# --------------------------------------------------------------------------------------------
# Applying the mappings
# --------------------------------------------------------------------------------------------


def _check_streams(x: torch.Tensor) -> tuple[int, int]:
    _check_float("x", x)
    _check(x.dim() >= 2, f"x must have shape [..., n, C], got {tuple(x.shape)}")
    return x.shape[-2], x.shape[-1]


def apply_pre(x: torch.Tensor, h_pre: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """Aggregate the streams into the layer input: ``[..., C] = sum_i h_pre[i] x[i]``.

    Accumulates in fp32 and returns x's dtype.
    """
    n, _ = _check_streams(x)
    _check(tuple(h_pre.shape) == (*x.shape[:-2], n),
           f"h_pre must have shape {(*x.shape[:-2], n)} ([..., n]), got {tuple(h_pre.shape)}")
    return torch.ops.mhc.apply_pre(x, h_pre, resolve_backend(backend, x.device))


def apply_post_res(
    x: torch.Tensor,
    y: torch.Tensor,
    h_post: torch.Tensor,
    h_res: torch.Tensor,
    backend: str = "torch",
) -> torch.Tensor:
    """Mix the streams and write the layer output back: ``h_res @ x + h_post^T y``.

    x ``[..., n, C]``, y ``[..., C]``, h_post ``[..., n]``, h_res ``[..., n, n]`` ->
    ``[..., n, C]``; row i of h_res mixes into stream i. fp32 accumulation, x's dtype out.
    """
    n, c = _check_streams(x)
    lead = tuple(x.shape[:-2])
    _check(tuple(y.shape) == (*lead, c), f"y must have shape {(*lead, c)} ([..., C]), got {tuple(y.shape)}")
    _check(tuple(h_post.shape) == (*lead, n),
           f"h_post must have shape {(*lead, n)} ([..., n]), got {tuple(h_post.shape)}")
    _check(tuple(h_res.shape) == (*lead, n, n),
           f"h_res must have shape {(*lead, n, n)} ([..., n, n]), got {tuple(h_res.shape)}")
    return torch.ops.mhc.apply_post_res(x, y, h_post, h_res, resolve_backend(backend, x.device))


# --------------------------------------------------------------------------------------------
# The torch backend's split of a connection (no kernel implements these: no backend argument)
# --------------------------------------------------------------------------------------------


def mhc_read_res_mix(
    x: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    t_max: int,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mhc_pre_mappings`` plus ``res_x = H_res x`` (``[..., n, C]``, fp32), torch backend only.

    With ``apply_post`` it computes ``apply_post_res`` split differently between a connection's
    read and write: the read mixes the streams, the write adds ``H_post^T y``. All of the
    streams' gradient then comes out of the read's one autograd node, written into one buffer,
    instead of two stream-sized gradients that autograd adds (docs/benchmarks.md, step time).
    """
    _check_mapping_inputs(x, phi, alpha, bias)
    _check(int(t_max) >= 1, f"t_max must be >= 1, got {t_max}")
    u, h_pre, h_post, h_res, res_x, _, _ = torch.ops.mhc.mhc_read_res_mix(x, phi, alpha, bias, int(t_max), float(eps))
    return u, h_pre, h_post, h_res, res_x


def apply_post(res_x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``res_x + h_post^T y`` in ``out_dtype``, stored stream-major: the write after
    ``mhc_read_res_mix`` (a new tensor; res_x is left as it is)."""
    n, c = _check_streams(res_x)
    lead = tuple(res_x.shape[:-2])
    _check(tuple(y.shape) == (*lead, c), f"y must have shape {(*lead, c)} ([..., C]), got {tuple(y.shape)}")
    _check(tuple(h_post.shape) == (*lead, n),
           f"h_post must have shape {(*lead, n)} ([..., n]), got {tuple(h_post.shape)}")
    return torch.ops.mhc.apply_post(res_x, y, h_post, out_dtype)


# --------------------------------------------------------------------------------------------
# Gain metric (Figs 3 and 7)
# --------------------------------------------------------------------------------------------


def amax_gain(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Amax gain magnitude of ``[..., n, n]`` mappings: (max |row sum|, max |column sum|).

    The row sum bounds how much a forward signal can grow, the column sum the backward one.
    """
    _check_float("h", h)
    _check(h.dim() >= 2 and h.shape[-1] == h.shape[-2], f"h must have shape [..., n, n], got {tuple(h.shape)}")
    forward = h.sum(dim=-1).abs().amax(dim=-1)
    backward = h.sum(dim=-2).abs().amax(dim=-1)
    return forward, backward
