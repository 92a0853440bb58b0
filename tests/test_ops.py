"""The public mHC ops against plain-loop references of the paper's equations (Eq 14-19)."""

import math

import pytest
import torch

from mhc_train.residual import amax_gain, apply_post_res, apply_pre, mhc_mappings, mhc_pre_mappings
from test_sinkhorn import loop_sinkhorn


def loop_mappings(x, phi, alpha, bias, t_max):
    """One token: x [n, C] -> (h_pre [n], h_post [n], h_res [n, n]) with explicit loops."""
    n, c = x.shape
    vec = [float(x[i, j]) for i in range(n) for j in range(c)]  # stream-major flatten
    r = math.sqrt(sum(v * v for v in vec) / (n * c))
    width = n * n + 2 * n
    proj = [sum(vec[k] * float(phi[k, col]) for k in range(n * c)) for col in range(width)]
    gate = [float(alpha[0])] * n + [float(alpha[1])] * n + [float(alpha[2])] * (n * n)
    logits = [proj[col] / r * gate[col] + float(bias[col]) for col in range(width)]
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    h_pre = torch.tensor([sig(v) for v in logits[:n]], dtype=torch.float64)
    h_post = torch.tensor([2 * sig(v) for v in logits[n : 2 * n]], dtype=torch.float64)
    res_logits = torch.tensor(logits[2 * n :], dtype=torch.float64).view(n, n)  # row-major
    return h_pre, h_post, loop_sinkhorn(res_logits, t_max)


def random_inputs(lead, n, c, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, c, generator=g).to(dtype)
    phi = torch.randn(n * c, n * n + 2 * n, generator=g) * 0.3
    alpha = torch.tensor([0.7, 1.3, 0.9])
    bias = torch.randn(n * n + 2 * n, generator=g) * 0.5
    return x, phi, alpha, bias


@pytest.mark.parametrize("n", [1, 2, 4])
def test_mappings_match_loop_reference(n):
    x, phi, alpha, bias = random_inputs((2, 3), n, 5)
    h_pre, h_post, h_res = mhc_mappings(x, phi, alpha, bias, t_max=6)
    assert h_pre.shape == (2, 3, n) and h_post.shape == (2, 3, n) and h_res.shape == (2, 3, n, n)
    for b in range(2):
        for s in range(3):
            ref = loop_mappings(x[b, s].double(), phi.double(), alpha.double(), bias.double(), 6)
            for got, want in zip((h_pre[b, s], h_post[b, s], h_res[b, s]), ref):
                assert torch.allclose(got.double(), want, atol=2e-6), (got, want)


def test_mappings_in_fp32_for_bf16_activations():
    x, phi, alpha, bias = random_inputs((4,), 4, 8, dtype=torch.bfloat16)
    outs = mhc_mappings(x, phi, alpha, bias, t_max=20)
    assert all(o.dtype == torch.float32 for o in outs)
    ref = mhc_mappings(x.float(), phi, alpha, bias, t_max=20)
    for got, want in zip(outs, ref):
        assert torch.equal(got, want)  # same fp32 maths on the same (bf16-representable) values
    assert torch.allclose(outs[2].sum(-1), torch.ones(4, 4), atol=1e-6)


def test_mappings_gradients_reach_phi_alpha_bias():
    x, phi, alpha, bias = random_inputs((6,), 4, 8)
    for t in (x, phi, alpha, bias):
        t.requires_grad_(True)
    h_pre, h_post, h_res = mhc_mappings(x, phi, alpha, bias, t_max=20)
    (h_pre.sum() + (h_post * torch.arange(4.0)).sum() + (h_res * torch.randn(6, 4, 4)).sum()).backward()
    for t in (x, phi, alpha, bias):
        assert t.grad is not None and t.grad.abs().sum() > 0


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_apply_ops_match_loops(n):
    c = 7
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, c, generator=g)
    y = torch.randn(3, c, generator=g)
    h_pre, h_post = torch.rand(3, n, generator=g), torch.rand(3, n, generator=g) * 2
    h_res = torch.rand(3, n, n, generator=g)
    pre = apply_pre(x, h_pre)
    out = apply_post_res(x, y, h_post, h_res)
    for t in range(3):
        want_pre = sum(h_pre[t, i] * x[t, i] for i in range(n))
        assert torch.allclose(pre[t], want_pre, atol=1e-6)
        for i in range(n):  # row i of h_res mixes into stream i
            want = sum(h_res[t, i, j] * x[t, j] for j in range(n)) + h_post[t, i] * y[t]
            assert torch.allclose(out[t, i], want, atol=1e-6)


def test_h_res_is_applied_and_not_transposed():
    # Pitfall seen elsewhere: H_res computed but never applied, or applied from the wrong side.
    x = torch.stack([torch.full((3,), 1.0), torch.full((3,), 10.0)])  # streams 0 and 1
    y = torch.zeros(3)
    h_res = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # both outputs take stream 1
    out = apply_post_res(x, y, torch.zeros(2), h_res)
    assert torch.equal(out, torch.full((2, 3), 10.0))
    other = apply_post_res(x, y, torch.zeros(2), torch.eye(2))
    assert not torch.equal(out, other)


def test_apply_ops_keep_activation_dtype():
    x = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    y = torch.randn(2, 8, dtype=torch.bfloat16)
    h = torch.rand(2, 4)
    assert apply_pre(x, h).dtype == torch.bfloat16
    assert apply_post_res(x, y, h, torch.rand(2, 4, 4)).dtype == torch.bfloat16


def test_amax_gain():
    h = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    fwd, bwd = amax_gain(h)
    assert fwd.item() == 2.0  # |1 - 3|
    assert bwd.item() == 2.5  # |-3 + 0.5|
    f, b = amax_gain(torch.eye(4).expand(5, 4, 4))
    assert torch.equal(f, torch.ones(5)) and torch.equal(b, torch.ones(5))


def test_bad_shapes_name_the_expected_shape():
    x, phi, alpha, bias = random_inputs((2,), 4, 8)
    with pytest.raises(ValueError, match=r"phi must have shape \[n\*C, n\*n\+2n\] = \[32, 24\]"):
        mhc_mappings(x, phi[:, :20], alpha, bias, 20)
    with pytest.raises(ValueError, match=r"alpha must have shape \[3\]"):
        mhc_mappings(x, phi, alpha[:2], bias, 20)
    with pytest.raises(ValueError, match=r"bias must have shape \[24\]"):
        mhc_mappings(x, phi, alpha, bias[:3], 20)
    with pytest.raises(ValueError, match=r"h_pre must have shape \(2, 4\)"):
        apply_pre(x, torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"h_res must have shape \(2, 4, 4\)"):
        apply_post_res(x, torch.randn(2, 8), torch.rand(2, 4), torch.rand(2, 4, 3))
    with pytest.raises(ValueError, match=r"y must have shape \(2, 8\)"):
        apply_post_res(x, torch.randn(2, 7), torch.rand(2, 4), torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="floating"):
        apply_pre(x.long(), torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"\[\.\.\., n, n\]"):
        amax_gain(torch.rand(3, 4))


def test_hand_written_backwards_pass_gradcheck():
    # The ops' hand-written backwards (mhc_train.residual.torch_ops) against finite differences.
    g = torch.Generator().manual_seed(3)
    n, c = 3, 5
    x = torch.randn(4, n, c, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, c, generator=g, dtype=torch.float64, requires_grad=True)
    h_pre = torch.rand(4, n, generator=g, dtype=torch.float64, requires_grad=True)
    h_post = torch.rand(4, n, generator=g, dtype=torch.float64, requires_grad=True)
    h_res = torch.rand(4, n, n, generator=g, dtype=torch.float64, requires_grad=True)
    phi = (torch.randn(n * c, n * n + 2 * n, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True)
    alpha = torch.tensor([0.7, 1.3, 0.9], dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n * n + 2 * n, generator=g, dtype=torch.float64, requires_grad=True)

    assert torch.autograd.gradcheck(apply_pre, (x, h_pre))  # fp64 inputs keep fp64 maths
    assert torch.autograd.gradcheck(apply_post_res, (x, y, h_post, h_res))
    assert torch.autograd.gradcheck(lambda *a: mhc_mappings(*a, t_max=5, eps=1e-6), (x, phi, alpha, bias))
    assert torch.autograd.gradcheck(lambda *a: mhc_pre_mappings(*a, t_max=5, eps=1e-6), (x, phi, alpha, bias))
    # each output's backward on its own (the others unused: no gradient reaches them)
    for i in range(3):
        assert torch.autograd.gradcheck(lambda *a, i=i: mhc_mappings(*a, t_max=5, eps=1e-6)[i], (x, phi, alpha, bias))


def test_hand_written_backwards_match_plain_autograd():
    x, phi, alpha, bias = random_inputs((3, 2), 4, 6)
    y = torch.randn(3, 2, 6)
    leaves = [t.clone().requires_grad_(True) for t in (x, phi, alpha, bias, y)]

    def plain(x, phi, alpha, bias, y):
        n, c = 4, 6
        xf = x.reshape(3, 2, n * c)
        gate = torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)])
        logits = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True)) * (xf @ phi) * gate + bias
        pre, post = torch.sigmoid(logits[..., :n]), 2 * torch.sigmoid(logits[..., n : 2 * n])
        from mhc_train.residual.sinkhorn import sinkhorn_knopp_torch

        res = sinkhorn_knopp_torch(logits[..., 2 * n :].unflatten(-1, (n, n)), 20, recompute_backward=False)
        u = (pre.unsqueeze(-1) * x).sum(-2)
        return (res @ x + post.unsqueeze(-1) * y.unsqueeze(-2)).sum() + (u * u).sum()

    def ours(x, phi, alpha, bias, y):
        pre, post, res = mhc_mappings(x, phi, alpha, bias, 20)
        u = apply_pre(x, pre)
        return apply_post_res(x, y, post, res).sum() + (u * u).sum()

    plain(*leaves).backward()
    want = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    ours(*leaves).backward()
    for got, w in zip((t.grad for t in leaves), want):
        assert torch.allclose(got, w, atol=1e-5, rtol=1e-4)


def test_pre_mappings_is_mappings_then_pre():


    x, phi, alpha, bias = random_inputs((2, 3), 4, 6)
    u, h_pre, h_post, h_res = mhc_pre_mappings(x, phi, alpha, bias, 20)
    ref = mhc_mappings(x, phi, alpha, bias, 20)
    for got, want in zip((h_pre, h_post, h_res), ref):
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(u, apply_pre(x, ref[0]), atol=1e-6)
    # ... and its one-node backward equals the composed ops' gradients.
    y = torch.randn(2, 3, 6)
    leaves = [t.clone().requires_grad_(True) for t in (x, phi, alpha, bias)]

    def loss(fused):
        xx, p, a, b = leaves
        if fused:
            uu, hp, hpost, hres = mhc_pre_mappings(xx, p, a, b, 20)
        else:
            hp, hpost, hres = mhc_mappings(xx, p, a, b, 20)
            uu = apply_pre(xx, hp)
        return (uu * y).sum() + (hpost * torch.arange(4.0)).sum() + (hres * hres).sum() + hp.sum()

    loss(False).backward()
    want = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    loss(True).backward()
    for got, w in zip((t.grad for t in leaves), want):
        assert torch.allclose(got, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_res_mix_in_read_equals_pre_mappings_then_post_res(dtype):
    # The torch backend's connection split (read mixes H_res x, write adds H_post^T y) against
    # the public ops: same values, same gradients, including direct uses of h_pre / h_res and
    # an upstream gradient with a stride-0 stream axis (the stream sum before the head).
    from mhc_train.residual.ops import apply_post, mhc_read_res_mix

    x, phi, alpha, bias = random_inputs((2, 3), 4, 6)
    x = x.to(dtype)
    g = torch.Generator().manual_seed(7)
    y = torch.randn(2, 3, 6, generator=g).to(dtype)
    weight = torch.randn(2, 3, 4, 4, generator=g)

    def run(split):
        leaves = [t.clone().requires_grad_(True) for t in (x, phi, alpha, bias, y)]
        xx, p, a, b, yy = leaves
        if split:
            u, h_pre, h_post, h_res, res_x = mhc_read_res_mix(xx, p, a, b, 20)
            out = apply_post(res_x, yy, h_post, xx.dtype)
        else:
            u, h_pre, h_post, h_res = mhc_pre_mappings(xx, p, a, b, 20)
            out = apply_post_res(xx, yy, h_post, h_res)
        loss = (out.float().sum(-2) ** 2).sum() + (u.float() ** 2).sum() + h_pre.sum() + (h_res * weight).sum()
        loss.backward()
        return out, [t.grad for t in leaves]

    out_split, grads_split = run(True)
    out_ref, grads_ref = run(False)
    assert out_split.dtype == dtype
    assert torch.allclose(out_split.float(), out_ref.float(), atol=1e-5)
    # bf16: the split rounds the streams' gradient once (one fp32 buffer), the reference rounds
    # its two parts and their sum, so they agree to bf16 steps of the largest entry.
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip(grads_split, grads_ref):
        assert torch.allclose(got.float(), want.float(), atol=tol * want.abs().max().item(), rtol=tol)


def test_res_mix_in_read_gradcheck():
    from mhc_train.residual.ops import apply_post, mhc_read_res_mix

    g = torch.Generator().manual_seed(5)
    n, c = 3, 5
    x = torch.randn(4, n, c, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, c, generator=g, dtype=torch.float64, requires_grad=True)
    phi = (torch.randn(n * c, n * n + 2 * n, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True)
    alpha = torch.tensor([0.7, 1.3, 0.9], dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n * n + 2 * n, generator=g, dtype=torch.float64, requires_grad=True)

    def connection(x, phi, alpha, bias, y):
        u, h_pre, h_post, h_res, res_x = mhc_read_res_mix(x, phi, alpha, bias, 5, eps=1e-6)
        return u, h_pre, h_res, apply_post(res_x, y, h_post, x.dtype)

    assert torch.autograd.gradcheck(connection, (x, phi, alpha, bias, y))


def test_res_mix_streams_are_stored_stream_major_and_chain_exactly():
    # The torch path keeps the streams in [n, T, C] memory: the write's output, and the gradient
    # the read returns, are stored that way; a second connection reads them without a copy and
    # its backward hands stream-major gradients to the first. Two chained connections, fed
    # standard-layout streams, pass gradcheck against finite differences in float64.
    from mhc_train.residual.ops import apply_post, mhc_read_res_mix

    g = torch.Generator().manual_seed(11)
    n, c = 3, 4
    x = torch.randn(2, 3, n, c, generator=g, dtype=torch.float64, requires_grad=True)
    ys = [torch.randn(2, 3, c, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    params = []
    for _ in range(2):
        params += [(torch.randn(n * c, n * n + 2 * n, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True),
                   torch.tensor([0.7, 1.3, 0.9], dtype=torch.float64, requires_grad=True),
                   torch.randn(n * n + 2 * n, generator=g, dtype=torch.float64, requires_grad=True)]

    def stream_major(t):
        return t.movedim(-2, 0).is_contiguous()

    def two_connections(x, y0, y1, *p):
        streams, outs = x, []
        for y, (phi, alpha, bias) in zip((y0, y1), (p[:3], p[3:])):
            u, h_pre, h_post, h_res, res_x = mhc_read_res_mix(streams, phi, alpha, bias, 4, eps=1e-6)
            streams = apply_post(res_x, y, h_post, streams.dtype)
            assert stream_major(streams) and not streams._is_view()
            outs += [u, h_res]
        return (*outs, streams)

    assert torch.autograd.gradcheck(two_connections, (x, *ys, *params))
    out = two_connections(x, *ys, *params)[-1]
    grad_x, = torch.autograd.grad(out.sum(-2).pow(2).sum(), x)  # stride-0 upstream gradient
    assert stream_major(grad_x)


@pytest.mark.parametrize("n, dtype, use_write", [(1, torch.float32, True), (4, torch.bfloat16, True),
                                                (4, torch.float32, False)])
def test_res_mix_chain_matches_the_public_ops(n, dtype, use_write):
    # Two chained connections (the second reads stream-major streams, the first gets a
    # stream-major gradient) against mhc_pre_mappings + apply_post_res; n = 1, bf16 streams,
    # and a chain whose last write output is unused (no gradient reaches its res_x).
    from mhc_train.residual.ops import apply_post, mhc_read_res_mix

    c = 6
    x, phi0, alpha, bias0 = random_inputs((2, 3), n, c, seed=1)
    _, phi1, _, bias1 = random_inputs((2, 3), n, c, seed=2)
    x = x.to(dtype)
    ys = [torch.randn(2, 3, c, generator=torch.Generator().manual_seed(s)).to(dtype) for s in (3, 4)]

    def run(split):
        leaves = [t.clone().requires_grad_(True) for t in (x, phi0, bias0, phi1, bias1, *ys)]
        streams, loss = leaves[0], 0.0
        for (phi, bias), y in zip((leaves[1:3], leaves[3:5]), leaves[5:]):
            if split:
                u, _, h_post, h_res, res_x = mhc_read_res_mix(streams, phi, alpha, bias, 10)
                out = apply_post(res_x, y, h_post, streams.dtype)
            else:
                u, _, h_post, h_res = mhc_pre_mappings(streams, phi, alpha, bias, 10)
                out = apply_post_res(streams, y, h_post, h_res)
            loss = loss + (u.float() ** 2).sum() + (h_res ** 2).sum()
            streams = out
        if use_write:
            loss = loss + (streams.float().sum(-2) ** 2).sum()
        loss.backward()
        return streams, [t.grad for t in leaves]

    out_split, grads_split = run(True)
    out_ref, grads_ref = run(False)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out_split.float(), out_ref.float(), atol=tol, rtol=tol)
    for got, want in zip(grads_split, grads_ref):
        if want is None:
            assert got is None
            continue
        assert torch.allclose(got.float(), want.float(), atol=tol * want.abs().max().item(), rtol=tol)


def test_mapping_maths_stays_fp32_under_bf16_autocast():
    # Autocast would run the projection in bf16 (and refuses in-place products of mixed dtypes):
    # the read's mappings and mix, and their gradients, are the fp32 ones under autocast too.
    from mhc_train.residual.ops import apply_post, mhc_read_res_mix

    x, phi, alpha, bias = random_inputs((2, 8), 4, 16)
    phi = phi * 3  # logits of ~10: bf16 rounding of x . phi would show

    def run(autocast: bool):
        leaves = [t.clone().requires_grad_(True) for t in (x, phi, alpha, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            u, h_pre, h_post, h_res, res_x = mhc_read_res_mix(*leaves, 20)
            out = apply_post(res_x, u.float(), h_post, torch.float32)
        (out.square().sum() + h_res.square().sum()).backward()
        return [h_pre, h_post, h_res, out] + [t.grad for t in leaves]

    for got, want in zip(run(True), run(False)):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_row_dot_blocks_match_one_product(monkeypatch):
    # _row_dot walks the tokens in cache-sized blocks on CPU; a last, partial block included.
    from mhc_train.residual import torch_ops

    x, v = torch.randn(10, 4, 6), torch.randn(10, 6)
    monkeypatch.setattr(torch_ops, "_ROW_DOT_BLOCK_FLOATS", 3 * 4 * 6)
    got = torch_ops._row_dot(x, v)
    assert torch.allclose(got, torch.einsum("tic,tc->ti", x, v), atol=1e-6)
