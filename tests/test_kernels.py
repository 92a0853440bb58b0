"""The Triton kernels (mhc_kernels) against the torch references, forward and backward.

On CPU they run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports the kernels), which is ~1000x slower than torch: shapes stay tiny. With a GPU
and the interpreter off, the same tests run on CUDA tensors.

The interpreter rounds fp32 -> bf16 stores toward zero (GPUs round to nearest even), so bf16
outputs are compared within two bf16 ulps; fp32 within fp32 rounding.
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton")

import mhc_kernels  # noqa: E402
from mhc_kernels._common import check_devices, is_interpreted  # noqa: E402
from mhc_kernels.sinkhorn import _sinkhorn_fwd_kernel  # noqa: E402
from mhc_train.bench.gpu_check import SHAPES  # noqa: E402
from mhc_train.residual import ops  # noqa: E402
from mhc_train.residual.sinkhorn import sinkhorn_knopp_torch  # noqa: E402

if is_interpreted(_sinkhorn_fwd_kernel):
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

NS = [1, 2, 4, 8]
DTYPES = [torch.float32, torch.bfloat16]


def rand(*shape, seed=0, dtype=torch.float32, scale=1.0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)
    return t.requires_grad_(requires_grad)


def close(got, want, dtype=torch.float32, tol=2e-5):
    """fp32: ~fp32 rounding. bf16 / fp16 outputs: two bf16 ulps of the magnitude (rtol 2^-7).
    Tolerances scale with the tensor's own largest entry (never a floor of 1: gradients of 1e-5
    would pass as zeros), and a reference that is not all zero must not be met by zeros."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = want.abs().max().item()
    if scale > 0:
        assert got.abs().max().item() > 0, "all zeros against a non-zero reference"
    if dtype in (torch.bfloat16, torch.float16):
        torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2 ** -7 * max(scale, 1e-30))
    else:
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(scale, 1e-30))


def grads(outs, inputs, seed=99):
    """Gradients of sum(out * fixed random weights) wrt inputs (same weights for both sides)."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(o.shape, generator=g).to(o.dtype).to(DEVICE) for o in outs]
    return torch.autograd.grad(outs, inputs, ws, allow_unused=True)


def mapping_inputs(lead, n, c, dtype=torch.float32, seed=0):
    x = rand(*lead, n, c, seed=seed, dtype=dtype)
    phi = rand(n * c, n * n + 2 * n, seed=seed + 1, scale=0.3)
    alpha = torch.tensor([0.7, 1.3, 0.9], device=DEVICE, requires_grad=True)
    bias = rand(n * n + 2 * n, seed=seed + 2, scale=0.5)
    return x, phi, alpha, bias


# --------------------------------------------------------------------------------------------
# Sinkhorn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", NS + [3])
def test_sinkhorn_matches_reference(n):
    logits = rand(5, n, n, seed=n, scale=3.0)
    out = mhc_kernels.sinkhorn_knopp(logits, 7)
    want = sinkhorn_knopp_torch(logits, 7)
    assert out.dtype == torch.float32
    close(out, want)
    close(out.sum(-1), torch.ones(5, n))
    close(grads([out], [logits])[0], grads([want], [logits])[0])


def test_sinkhorn_large_logits_and_many_iterations():
    # exp(200) overflows fp32: the max shift keeps it finite. t_max = 20 exercises the
    # O(t_max^2) recomputing backward.
    logits = (rand(2, 3, 4, 4, seed=1, scale=4.0, requires_grad=False) + 200.0).requires_grad_()
    out = mhc_kernels.sinkhorn_knopp(logits, 20)
    want = sinkhorn_knopp_torch(logits, 20)
    assert torch.isfinite(out).all()
    close(out, want, tol=1e-4)
    close(grads([out], [logits])[0], grads([want], [logits])[0], tol=1e-4)


@pytest.mark.parametrize("t_max", [1, 5])
def test_sinkhorn_against_autograd_through_iterations(t_max):
    logits = rand(4, 4, 4, seed=2)
    out = mhc_kernels.sinkhorn_knopp(logits, t_max)
    want = sinkhorn_knopp_torch(logits, t_max, recompute_backward=False)
    close(out, want)
    close(grads([out], [logits])[0], grads([want], [logits])[0])


def test_sinkhorn_bf16_logits():
    logits = rand(3, 4, 4, seed=3, dtype=torch.bfloat16)
    out = mhc_kernels.sinkhorn_knopp(logits, 6)
    ref_in = logits.detach().float().requires_grad_()
    want = sinkhorn_knopp_torch(ref_in, 6)
    assert out.dtype == torch.float32
    close(out, want)
    (g,) = grads([out], [logits])
    assert g.dtype == torch.bfloat16
    close(g, grads([want], [ref_in])[0], dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Mappings (Eq 14-19)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
def test_mappings_match_reference(n, dtype):
    c = 13 if n < 8 else 5  # K = nC not a multiple of the K block
    x, phi, alpha, bias = mapping_inputs((2, 3), n, c, dtype=dtype, seed=n)
    inputs = (x, phi, alpha, bias)
    got = mhc_kernels.mhc_mappings(x, phi, alpha, bias, 6, 1e-6)
    want = ops.mhc_mappings(x, phi, alpha, bias, 6, 1e-6)  # same (bf16) values, fp32 maths
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        close(a, b)
    g_got, g_want = grads(got, inputs), grads(want, inputs)
    close(g_got[0], g_want[0], dtype=dtype)
    assert g_got[0].dtype == dtype
    for a, b in zip(g_got[1:], g_want[1:]):
        close(a, b, tol=1e-4)


def test_mappings_many_tokens_and_k_blocks():
    # 40 tokens: several 16-token programs and token splits in the grad_phi reduction;
    # K = 4 * 40 = 160 spans several K blocks.
    x, phi, alpha, bias = mapping_inputs((40,), 4, 40, seed=5)
    inputs = (x, phi, alpha, bias)
    got = mhc_kernels.mhc_mappings(x, phi, alpha, bias, 4)
    want = ops.mhc_mappings(x, phi, alpha, bias, 4)
    for a, b in zip(got, want):
        close(a, b)
    for a, b in zip(grads(got, inputs), grads(want, inputs)):
        close(a, b, tol=1e-4)


@pytest.mark.parametrize("used", ["pre", "post", "res"])
def test_mappings_partial_outputs_and_inputs(used):
    # only one coefficient receives a gradient; x does not require one (phi, alpha, bias do)
    x, phi, alpha, bias = mapping_inputs((5,), 2, 9, seed=6)
    x = x.detach()
    pick = {"pre": 0, "post": 1, "res": 2}[used]
    got = mhc_kernels.mhc_mappings(x, phi, alpha, bias, 5)[pick]
    want = ops.mhc_mappings(x, phi, alpha, bias, 5)[pick]
    for a, b in zip(grads([got], (phi, alpha, bias)), grads([want], (phi, alpha, bias))):
        close(a, b, tol=1e-4)
    (gx_only,) = grads([mhc_kernels.mhc_mappings(x.requires_grad_(), phi.detach(), alpha, bias, 5)[pick]], [x])
    xr = x.detach().requires_grad_()
    close(gx_only, grads([ops.mhc_mappings(xr, phi, alpha, bias, 5)[pick]], [xr])[0], tol=1e-4)


def test_mappings_tf32_precision_setting_runs():
    x, phi, alpha, bias = mapping_inputs((4,), 4, 8, seed=7)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # the kernels use tf32 tl.dot (paper Eq 10)
        got = mhc_kernels.mhc_mappings(x, phi, alpha, bias, 5)
    finally:
        torch.set_float32_matmul_precision(before)
    for a, b in zip(got, ops.mhc_mappings(x, phi, alpha, bias, 5)):
        close(a, b, tol=5e-3)


# --------------------------------------------------------------------------------------------
# Apply ops
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
def test_apply_pre_matches_reference(n, dtype):
    x = rand(2, 2, n, 37, seed=n, dtype=dtype)  # C = 37: masked tail
    h = rand(2, 2, n, seed=n + 1).detach().sigmoid().requires_grad_()
    got = mhc_kernels.apply_pre(x, h)
    want = ops.apply_pre(x, h)
    assert got.dtype == dtype
    close(got, want, dtype=dtype)
    g_got, g_want = grads([got], [x, h]), grads([want], [x, h])
    close(g_got[0], g_want[0], dtype=dtype)
    close(g_got[1], g_want[1], tol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
def test_apply_post_res_matches_reference(n, dtype):
    c = 37
    x = rand(3, n, c, seed=n, dtype=dtype)
    y = rand(3, c, seed=n + 1, dtype=dtype)
    h_post = rand(3, n, seed=n + 2)
    h_res = rand(3, n, n, seed=n + 3)
    inputs = (x, y, h_post, h_res)
    got = mhc_kernels.apply_post_res(*inputs)
    want = ops.apply_post_res(*inputs)
    assert got.dtype == dtype
    close(got, want, dtype=dtype)
    g_got, g_want = grads([got], inputs), grads([want], inputs)
    close(g_got[0], g_want[0], dtype=dtype)
    close(g_got[1], g_want[1], dtype=dtype)
    close(g_got[2], g_want[2], tol=1e-4)
    close(g_got[3], g_want[3], tol=1e-4)


def test_fp16_inputs():
    x, phi, alpha, bias = mapping_inputs((3,), 4, 11, dtype=torch.float16, seed=8)
    y = rand(3, 11, seed=9, dtype=torch.float16)
    inputs = (x, phi, alpha, bias, y)
    u, h_pre, h_post, h_res = mhc_kernels.fused_pre_mappings(x, phi, alpha, bias, 4)
    got = mhc_kernels.apply_post_res(x, y, h_post, h_res)
    w_pre, w_post, w_res = ops.mhc_mappings(x, phi, alpha, bias, 4)
    w_u = ops.apply_pre(x, w_pre)
    want = ops.apply_post_res(x, y, w_post, w_res)
    assert got.dtype == u.dtype == torch.float16
    close(u, w_u, dtype=torch.float16)
    close(got, want, dtype=torch.float16)
    g_got, g_want = grads([got, u], inputs), grads([want, w_u], inputs)
    for a, b in zip(g_got, g_want):
        close(a, b, dtype=torch.float16)


def test_apply_partial_gradients():
    x = rand(4, 4, 20, seed=1)
    y = rand(4, 20, seed=2)
    h_post, h_res = rand(4, 4, seed=3, requires_grad=False), rand(4, 4, 4, seed=4, requires_grad=False)
    got = mhc_kernels.apply_post_res(x, y, h_post, h_res)
    want = ops.apply_post_res(x, y, h_post, h_res)
    for a, b in zip(grads([got], [x, y]), grads([want], [x, y])):
        close(a, b)
    h = rand(4, 4, seed=5)
    got = mhc_kernels.apply_pre(x.detach(), h)
    close(grads([got], [h])[0], grads([ops.apply_pre(x.detach(), h)], [h])[0], tol=1e-4)



def test_apply_kernels_run_several_tokens_per_program():
    """The apply kernels' tuned tiles: BLOCK_T tokens x BLOCK_C features a program. Under the
    interpreter the one config is multi-token, so the tests below run partial token blocks."""
    from mhc_kernels import apply

    configs = apply._apply_configs()
    if is_interpreted(apply._apply_pre_fwd_kernel):
        assert len(configs) == 1 and configs[0].kwargs["BLOCK_T"] > 1
    assert all({"BLOCK_T", "BLOCK_C"} <= set(c.kwargs) for c in configs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7])  # 7: a full and a partial token block of 4
def test_apply_partial_token_and_feature_blocks(tokens, dtype):
    """T not a multiple of BLOCK_T, C not a multiple of BLOCK_C (37 = 32 + 5 under the
    interpreter), n not a power of two; every subset of gradients, against the reference."""
    from mhc_train.residual import torch_ops

    n, c = 3, 37
    x = rand(tokens, n, c, seed=1, dtype=dtype, requires_grad=False)
    y = rand(tokens, c, seed=2, dtype=dtype, requires_grad=False)
    h_pre = rand(tokens, n, seed=3, requires_grad=False).sigmoid()
    h_post = rand(tokens, n, seed=4, requires_grad=False)
    h_res = rand(tokens, n, n, seed=5, requires_grad=False)
    g_u = rand(tokens, c, seed=6, dtype=dtype, requires_grad=False)
    g_out = rand(tokens, n, c, seed=7, dtype=dtype, requires_grad=False)

    close(mhc_kernels.apply_pre_forward(x, h_pre), torch_ops.apply_pre_forward(x, h_pre), dtype=dtype)
    close(mhc_kernels.apply_post_res_forward(x, y, h_post, h_res),
          torch_ops.apply_post_res_forward(x, y, h_post, h_res), dtype=dtype)
    for needs in ([True, False], [False, True], [True, True]):
        got = mhc_kernels.apply_pre_backward(x, h_pre, g_u, needs)
        want = torch_ops.apply_pre_backward(x, h_pre, g_u, needs)
        for a, b, need, t in zip(got, want, needs, (x, h_pre)):
            assert (a is None) == (not need)
            if need:
                close(a, b, dtype=t.dtype, tol=1e-4)
    inputs = (x, y, h_post, h_res)
    for k in range(5):  # each gradient alone, then all four
        needs = [True] * 4 if k == 4 else [i == k for i in range(4)]
        got = mhc_kernels.apply_post_res_backward(*inputs, g_out, needs)
        want = torch_ops.apply_post_res_backward(*inputs, g_out, needs)
        for a, b, need, t in zip(got, want, needs, inputs):
            assert (a is None) == (not need)
            if need:
                close(a, b, dtype=t.dtype, tol=1e-4)


# --------------------------------------------------------------------------------------------
# Fused mappings + H_pre x
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
def test_fused_pre_mappings_match_reference(n, dtype):
    c = 21 if n < 8 else 7
    x, phi, alpha, bias = mapping_inputs((2, 2), n, c, dtype=dtype, seed=10 + n)
    inputs = (x, phi, alpha, bias)
    got = mhc_kernels.fused_pre_mappings(x, phi, alpha, bias, 5, 1e-6)
    h = ops.mhc_mappings(x, phi, alpha, bias, 5, 1e-6)
    want = (ops.apply_pre(x, h[0]), *h)
    assert got[0].dtype == dtype and all(o.dtype == torch.float32 for o in got[1:])
    close(got[0], want[0], dtype=dtype)
    for a, b in zip(got[1:], want[1:]):
        close(a, b)
    g_got, g_want = grads(got, inputs), grads(want, inputs)
    close(g_got[0], g_want[0], dtype=dtype)
    for a, b in zip(g_got[1:], g_want[1:]):
        close(a, b, tol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [3, 4])
def test_fused_pre_backward_equals_reference_backward(n, dtype):
    # The fused read's backward (coefficient kernel with the x . g_u pass, then the grad_x /
    # grad_phi kernel over K slices of all n streams) against torch_ops' backward, called
    # directly with the same saved tensors: 40 tokens (several token blocks and grad_phi splits),
    # C = 37 (several masked K slices; n = 3 pads the stream axis). Relative error per tensor.
    from mhc_train.residual import torch_ops

    x, phi, alpha, bias = (t.detach() for t in mapping_inputs((40,), n, 37, dtype=dtype, seed=20 + n))
    fwd = torch_ops.mhc_pre_mappings_forward(x, phi, alpha, bias, 5, 1e-6)
    _, h_pre, h_post, _, proj, inv_r = fwd
    g_u = rand(40, 37, seed=31, dtype=dtype, requires_grad=False)
    g_pre, g_post = rand(40, n, seed=32, requires_grad=False), rand(40, n, seed=33, requires_grad=False)
    g_res = rand(40, n, n, seed=34, requires_grad=False)
    for used in [(g_u, g_pre, g_post, g_res), (g_u, None, None, None), (None, g_pre, None, g_res)]:
        args = (x, phi, alpha, bias, proj, inv_r, h_pre, h_post, *used, 5, (True, True, True, True))
        got = mhc_kernels.mhc_pre_mappings_backward(*args)
        want = torch_ops.mhc_pre_mappings_backward(*args)
        close(got[0], want[0], dtype=dtype)
        assert got[0].dtype == dtype
        for a, b in zip(got[1:], want[1:]):
            close(a, b, tol=1e-4)


def test_fused_pre_only_u_used():
    x, phi, alpha, bias = mapping_inputs((6,), 4, 10, seed=3)
    inputs = (x, phi, alpha, bias)
    u = mhc_kernels.fused_pre_mappings(x, phi, alpha, bias, 4)[0]
    want = ops.apply_pre(x, ops.mhc_mappings(x, phi, alpha, bias, 4)[0])
    close(u, want)
    for a, b in zip(grads([u], inputs), grads([want], inputs)):
        close(a, b, tol=1e-4)


# --------------------------------------------------------------------------------------------
# Layouts, empty inputs, no-grad, bad inputs
# --------------------------------------------------------------------------------------------


def test_non_contiguous_inputs():
    n, c = 4, 9
    base = rand(n, 3, c, seed=1)  # [n, T, C] -> transposed view [T, n, C]
    x = base.transpose(0, 1)
    assert not x.is_contiguous()
    h = rand(n, 3, seed=2).t()
    close(mhc_kernels.apply_pre(x, h), ops.apply_pre(x, h))
    close(grads([mhc_kernels.apply_pre(x, h)], [base])[0], grads([ops.apply_pre(x, h)], [base])[0])
    y = rand(c, 3, seed=3).t()
    h_res = rand(3, n, n, seed=4).transpose(1, 2)
    close(mhc_kernels.apply_post_res(x, y, h, h_res), ops.apply_post_res(x, y, h, h_res))
    _, phi, alpha, bias = mapping_inputs((3,), n, c, seed=5)
    phi_t = phi.detach().t().contiguous().t().requires_grad_()  # column-major phi
    got = mhc_kernels.mhc_mappings(x, phi_t, alpha, bias, 4)
    want = ops.mhc_mappings(x, phi_t, alpha, bias, 4)
    for a, b in zip(got, want):
        close(a, b)
    for a, b in zip(grads(got, [base, phi_t]), grads(want, [base, phi_t])):
        close(a, b, tol=1e-4)
    logits = rand(n, 2, n, seed=6).transpose(0, 1)
    close(mhc_kernels.sinkhorn_knopp(logits, 5), sinkhorn_knopp_torch(logits, 5))


def test_empty_token_dimension():
    x, phi, alpha, bias = mapping_inputs((0,), 2, 5)
    h_pre, h_post, h_res = mhc_kernels.mhc_mappings(x, phi, alpha, bias, 3)
    assert h_pre.shape == (0, 2) and h_res.shape == (0, 2, 2)
    (h_res.sum() + h_pre.sum()).backward()
    assert phi.grad.shape == phi.shape and phi.grad.abs().sum() == 0
    assert mhc_kernels.apply_pre(x, h_pre).shape == (0, 5)
    assert mhc_kernels.sinkhorn_knopp(torch.zeros(0, 3, 3, device=DEVICE), 2).shape == (0, 3, 3)


def test_no_grad_forward_matches():
    x, phi, alpha, bias = mapping_inputs((3,), 4, 6)
    with torch.no_grad():
        got = mhc_kernels.fused_pre_mappings(x, phi, alpha, bias, 4)
        h = ops.mhc_mappings(x, phi, alpha, bias, 4)
        want = (ops.apply_pre(x, h[0]), *h)
    for a, b in zip(got, want):
        assert not a.requires_grad
        close(a, b)


def test_bad_inputs_raise_value_error():
    x, phi, alpha, bias = (t.detach() for t in mapping_inputs((3,), 2, 5))
    h = torch.rand(3, 2, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        mhc_kernels.apply_pre(x.to(torch.int32), h)
    with pytest.raises(ValueError, match="float64"):
        mhc_kernels.apply_pre(x.double(), h.double())
    with pytest.raises(ValueError, match="dtype"):
        mhc_kernels.sinkhorn_knopp(torch.ones(2, 2, dtype=torch.int64, device=DEVICE), 3)
    with pytest.raises(ValueError, match="h_pre must have shape"):
        mhc_kernels.apply_pre(x, h[:, :1])
    with pytest.raises(ValueError, match=r"\[\.\.\., n, C\]"):
        mhc_kernels.apply_pre(x[0, 0], h)
    with pytest.raises(ValueError, match="phi must have shape"):
        mhc_kernels.mhc_mappings(x, phi[:-1], alpha, bias, 3)
    with pytest.raises(ValueError, match="alpha"):
        mhc_kernels.fused_pre_mappings(x, phi, alpha[:2], bias, 3)
    with pytest.raises(ValueError, match="t_max"):
        mhc_kernels.mhc_mappings(x, phi, alpha, bias, 0)
    with pytest.raises(ValueError, match="n, n"):
        mhc_kernels.sinkhorn_knopp(torch.zeros(2, 3, 4, device=DEVICE), 3)
    with pytest.raises(ValueError, match="n <= 8"):
        mhc_kernels.apply_pre(torch.zeros(1, 9, 4, device=DEVICE), torch.zeros(1, 9, device=DEVICE))
    with pytest.raises(ValueError, match="y must have shape"):
        mhc_kernels.apply_post_res(x, x[:, 0, :4], h, torch.rand(3, 2, 2, device=DEVICE))
    with pytest.raises(ValueError, match="device"):
        mhc_kernels.apply_pre(x.to("meta"), h.to("meta"))
    with pytest.raises(ValueError, match="CUDA tensors"):  # a compiled (not interpreted) kernel
        check_devices(lambda: None, x=torch.zeros(1))


# --------------------------------------------------------------------------------------------
# The public ops with backend="triton"
# --------------------------------------------------------------------------------------------


def test_public_ops_dispatch_to_triton():
    assert ops.resolve_backend("triton", torch.device(DEVICE)) == "triton"
    if DEVICE == "cpu":
        assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    x, phi, alpha, bias = mapping_inputs((2, 2), 4, 11, seed=4)
    inputs = (x, phi, alpha, bias)
    outs = {}
    for backend in ("torch", "triton"):
        h_pre, h_post, h_res = ops.mhc_mappings(x, phi, alpha, bias, 5, 1e-20, backend=backend)
        u = ops.apply_pre(x, h_pre, backend=backend)
        y = torch.tanh(u)  # stand-in layer F
        new = ops.apply_post_res(x, y, h_post, h_res, backend=backend)
        s = ops.sinkhorn_knopp(h_res.detach() * 3.0, 4, backend=backend)
        loss = (new * torch.linspace(-1, 1, 11, device=DEVICE)).sum() + (s * s).sum()
        outs[backend] = (new, s, *torch.autograd.grad(loss, inputs))
    for a, b in zip(outs["triton"], outs["torch"]):
        close(a, b, tol=1e-4)


def test_tiny_mhc_model_same_loss_and_gradients_with_triton():
    from mhc_train.model import MHCTransformer, load_model_config
    from mhc_train.residual import ResidualConfig

    cfg = load_model_config("tiny")
    tokens = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = MHCTransformer(cfg, ResidualConfig(variant="mhc", backend=backend, phi_init_std=0.02)).to(DEVICE)
        out = model(tokens[:, :-1].to(DEVICE), tokens[:, 1:].to(DEVICE))
        out.loss.backward()
        results[backend] = (out.loss, {k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    (loss_t, grads_t), (loss_k, grads_k) = results["torch"], results["triton"]
    close(loss_k, loss_t, tol=1e-5)
    assert grads_k.keys() == grads_t.keys()
    for k in grads_t:  # relative to each tensor: phi's gradient is ~1e-5, a zero one must fail
        assert grads_t[k].norm() > 0, k
        assert ((grads_k[k] - grads_t[k]).norm() / grads_t[k].norm()).item() <= 1e-4, k


# --------------------------------------------------------------------------------------------
# backend=auto: the self-test and its fallback, the interpreter refused on CUDA
# --------------------------------------------------------------------------------------------


def test_self_test_passes_the_kernels_and_catches_a_wrong_one(monkeypatch):
    import mhc_kernels
    from mhc_train.residual import backend

    assert backend.self_test(torch.device(DEVICE)) is None  # every kernel, forward and backward
    wrong = mhc_kernels.apply_pre_forward  # what torch.ops.mhc.apply_pre runs with backend="triton"
    monkeypatch.setattr(mhc_kernels, "apply_pre_forward", lambda x, h: wrong(x, h) * 1.01)
    reason = backend.self_test(torch.device(DEVICE))
    assert reason.startswith("kernel apply_pre disagrees with the reference"), reason

    def broken(*args):
        raise RuntimeError("PTX compilation failed\nmore lines")

    monkeypatch.setattr(mhc_kernels, "apply_pre_forward", broken)
    assert backend.self_test(torch.device(DEVICE)) == "kernel apply_pre failed: RuntimeError: PTX compilation failed"


def test_auto_uses_triton_on_cuda_only_after_the_self_test(monkeypatch):
    from mhc_train.residual import backend

    cuda = torch.device("cuda", 0)  # a device object only: nothing runs on it here
    monkeypatch.setattr(backend, "_auto_choice", {})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = []
    monkeypatch.setattr(backend, "self_test", lambda d: calls.append(d) or None)
    assert backend.resolve_backend("auto", cuda) == "triton"
    assert backend.resolve_backend("auto", cuda) == "triton" and len(calls) == 1  # tested once per device
    assert backend.resolve_backend("auto", torch.device("cpu")) == "torch"

    monkeypatch.setattr(backend, "_auto_choice", {})
    monkeypatch.setattr(backend, "self_test", lambda d: "kernel apply_pre failed: RuntimeError: no")
    with pytest.warns(UserWarning, match="running the torch reference of the mHC ops on cuda:0: kernel apply_pre"):
        assert backend.resolve_backend("auto", cuda) == "torch"
    assert backend.resolve_backend("auto", cuda) == "torch"  # warned once, decided for the run


def test_interpreted_kernels_are_refused_on_cuda(monkeypatch):
    from mhc_train.residual import backend

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(backend, "_auto_choice", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 set: the kernels would run in Triton's interpreter"):
        backend.resolve_backend("triton", cuda)
    with pytest.warns(UserWarning, match="TRITON_INTERPRET=1 is set"):
        assert backend.resolve_backend("auto", cuda) == "torch"
    assert backend.resolve_backend("triton", torch.device("cpu")) == "triton"  # the CPU tests' own use


def test_auto_is_the_default_backend():
    from mhc_train.residual import ResidualConfig

    assert ResidualConfig().backend == "auto"


# --------------------------------------------------------------------------------------------
# Production shapes: on a GPU with MHC_GPU_SHAPES=1 (make test-gpu); the interpreter keeps its
# small shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("MHC_GPU_SHAPES") != "1" or DEVICE != "cuda",
                    reason="production shapes: a GPU and MHC_GPU_SHAPES=1 (make test-gpu)")
@pytest.mark.parametrize("c", SHAPES["production"].widths)
def test_every_kernel_at_production_shapes(c):
    from mhc_train.bench.gpu_kernels import compare_kernels, stream_inputs

    s = SHAPES["production"]  # tokens = 4 x 8192, n = 4, bf16 streams; tolerances in gpu_kernels
    try:
        records = compare_kernels(s.batch * s.seq, s.n, c, s.t_max, s.stream_dtype, torch.device(DEVICE))
    finally:
        stream_inputs.cache_clear()
    failed = [r for r in records if not r["passed"]]
    assert records and not failed, failed
