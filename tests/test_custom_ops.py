"""The mHC ops as torch.library custom ops (``torch.ops.mhc.*``, mhc_train/residual/custom_ops.py).

- ``torch.library.opcheck`` on every forward and backward op: schema (no mutation, no aliasing),
  autograd registration, fake implementations against the real ones (shapes, dtypes, strides),
  and AOT dispatch with dynamic shapes (outputs and gradients as in eager). On the torch backend
  and, through Triton's interpreter (~1000x slower: tiny shapes), on the Triton backend.
- A transformer block compiled with ``fullgraph=True`` gives eager's outputs and gradients, with
  the connection ops as opaque nodes in the forward graph and their ``_backward`` ops in the
  backward graph: mHC and HC on the torch backend, mHC with the Triton kernels.
"""

import pytest
import torch

from mhc_train.residual import custom_ops, ops  # noqa: F401  (custom_ops defines torch.ops.mhc.*)

try:
    import mhc_kernels
    from mhc_kernels._common import is_interpreted
    from mhc_kernels.sinkhorn import _sinkhorn_fwd_kernel

    TRITON_ON_CPU = is_interpreted(_sinkhorn_fwd_kernel)
except ImportError:  # no triton
    mhc_kernels, TRITON_ON_CPU = None, False

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_ON_CPU, reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1"))]
T_MAX = 3
EPS = 1e-6


def rand(*shape, seed=0, scale=1.0, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_(grad)


def mapping_inputs(lead, n, c, dtype=torch.float32, grad=True):
    """x, phi, alpha, bias of ``ops.mhc_mappings``."""
    w = n * n + 2 * n
    return (rand(*lead, n, c, seed=1, dtype=dtype, grad=grad), rand(n * c, w, seed=2, scale=0.3, grad=grad),
            torch.tensor([0.7, 1.3, 0.9], requires_grad=grad), rand(w, seed=3, scale=0.5, grad=grad))


def sizes(backend):
    # The interpreter runs every program in Python: the smallest shapes that still have two
    # leading dims, several tokens and n > 1.
    return ((2, 2), 3, 5) if backend == "triton" else ((2, 3), 3, 5)


def forward_cases(backend, dtype=torch.float32):
    """(op name, args) of every forward op, inputs requiring grad (opcheck then checks the
    backward through AOT dispatch too)."""
    lead, n, c = sizes(backend)
    x, phi, alpha, bias = mapping_inputs(lead, n, c, dtype)
    y = rand(*lead, c, seed=4, dtype=dtype, grad=True)
    h_pre, h_post = rand(*lead, n, seed=5, grad=True), rand(*lead, n, seed=6, grad=True)
    h_res = torch.softmax(rand(*lead, n, n, seed=7), -1).requires_grad_()
    cases = [
        ("sinkhorn_knopp", (rand(*lead, n, n, seed=8, grad=True), T_MAX, backend)),
        ("mhc_mappings", (x, phi, alpha, bias, T_MAX, EPS, backend)),
        ("mhc_pre_mappings", (x, phi, alpha, bias, T_MAX, EPS, backend)),
        ("apply_pre", (x, h_pre, backend)),
        ("apply_post_res", (x, y, h_post, h_res, backend)),
    ]
    if backend == "torch":  # the model's split of a connection: torch only
        res_x = ops.mhc_read_res_mix(*(t.detach() for t in (x, phi, alpha, bias)), T_MAX)[-1].requires_grad_()
        cases += [("mhc_read_res_mix", (x, phi, alpha, bias, T_MAX, EPS)),
                  ("apply_post", (res_x, y, h_post, dtype)),
                  ("apply_post", (res_x, y, h_post, torch.bfloat16))]
    return cases


def backward_cases(backend):
    """(op name, args) of every backward op, from a real forward: all gradients, and some
    outputs without one (None) with some inputs not wanting one."""
    lead, n, c = sizes(backend)
    x, phi, alpha, bias = mapping_inputs(lead, n, c, grad=False)
    y, h_post, logits = rand(*lead, c, seed=4), rand(*lead, n, seed=6), rand(*lead, n, n, seed=8)
    h_res = torch.softmax(rand(*lead, n, n, seed=7), -1)
    g_c, g_n, g_nn, g_nc = (rand(*lead, c, seed=9), rand(*lead, n, seed=10), rand(*lead, n, n, seed=11),
                            rand(*lead, n, c, seed=12))
    maps = torch.ops.mhc.mhc_mappings(x, phi, alpha, bias, T_MAX, EPS, backend)
    pre = torch.ops.mhc.mhc_pre_mappings(x, phi, alpha, bias, T_MAX, EPS, backend)
    saved = (x, phi, alpha, bias, maps[3], maps[4], maps[0], maps[1])
    saved_pre = (x, phi, alpha, bias, pre[4], pre[5], pre[1], pre[2])
    everything, some = [True] * 4, [True, False, True, False]
    cases = [
        ("sinkhorn_knopp_backward", (logits, g_nn, T_MAX, backend)),
        ("mhc_mappings_backward", (*saved, g_n, g_n, g_nn, T_MAX, everything, backend)),
        ("mhc_mappings_backward", (*saved, None, g_n, None, T_MAX, some, backend)),
        ("mhc_pre_mappings_backward", (*saved_pre, g_c, g_n, g_n, g_nn, T_MAX, everything, backend)),
        ("mhc_pre_mappings_backward", (*saved_pre, g_c, None, g_n, None, T_MAX, some, backend)),
        ("apply_pre_backward", (x, h_post, g_c, [True, True], backend)),
        ("apply_pre_backward", (x, h_post, g_c, [False, True], backend)),
        ("apply_post_res_backward", (x, y, h_post, h_res, g_nc, everything, backend)),
        ("apply_post_res_backward", (x, y, h_post, h_res, g_nc, some, backend)),
    ]
    if backend == "torch":
        read = torch.ops.mhc.mhc_read_res_mix(x, phi, alpha, bias, T_MAX, EPS)
        saved_read = (x, phi, alpha, bias, read[5], read[6], read[1], read[2])
        g_sm = read[4].clone()  # a stream-major gradient, as the write hands it over
        cases += [
            ("mhc_read_res_mix_backward", (*saved_read, g_c, g_n, g_n, g_nn, g_sm, T_MAX, everything)),
            ("mhc_read_res_mix_backward", (*saved_read, None, None, g_n, None, g_nc, T_MAX, some)),
            ("apply_post_backward", (y, h_post, g_sm, [True, True])),
            ("apply_post_backward", (y, h_post, g_nc, [False, True])),
        ]
    return cases


def _ids(cases):
    return [name for name, _ in cases]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_forward_ops(backend):
    for name, args in forward_cases(backend):
        torch.library.opcheck(getattr(torch.ops.mhc, name), args)


def test_opcheck_forward_ops_with_bf16_streams():
    for name, args in forward_cases("torch", torch.bfloat16):
        torch.library.opcheck(getattr(torch.ops.mhc, name), args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward_ops(backend):
    for name, args in backward_cases(backend):
        torch.library.opcheck(getattr(torch.ops.mhc, name), args)


def test_every_op_is_checked_on_both_backends_where_both_implement_it():
    # a new op must join the cases above (and its backward op must exist)
    torch_ops = set(_ids(forward_cases("torch")))
    assert torch_ops == set(custom_ops.OPS)
    assert {name + "_backward" for name in torch_ops} == set(_ids(backward_cases("torch")))
    both = {"sinkhorn_knopp", "mhc_mappings", "mhc_pre_mappings", "apply_pre", "apply_post_res"}
    if mhc_kernels is not None:
        for name in both:
            assert all(callable(getattr(mhc_kernels, f"{name}_{part}")) for part in ("forward", "backward"))


def test_apply_post_writes_a_new_buffer():
    # The op may not return its input: res_x is left as the read made it.
    x, phi, alpha, bias = mapping_inputs((2, 3), 3, 5, grad=False)
    *_, res_x = ops.mhc_read_res_mix(x, phi, alpha, bias, T_MAX)
    before = res_x.clone()
    out = ops.apply_post(res_x, rand(2, 3, 5), rand(2, 3, 3), torch.float32)
    assert torch.equal(res_x, before) and out.untyped_storage().data_ptr() != res_x.untyped_storage().data_ptr()


# --------------------------------------------------------------------------------------------
# Compiled with fullgraph=True around the connection ops
# --------------------------------------------------------------------------------------------


def recording_backend(graphs: list):
    """aot_eager that records the ops of each forward and backward graph it is given."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(gm, _inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def block_and_inputs(variant, backend):
    from mhc_train.model import MHCTransformer, load_model_config
    from mhc_train.residual import ResidualConfig

    torch.manual_seed(0)
    cfg = load_model_config("tiny", n_layers=1, n_dense_layers=1)  # one dense block: quick to trace
    model = MHCTransformer(cfg, ResidualConfig(variant=variant, t_max=T_MAX, backend=backend, phi_init_std=0.05))
    seq = 3 if backend == "triton" else 5
    streams = rand(2, seq, 4, cfg.dim, seed=20)
    return model.blocks[0], streams, model.rope(seq, streams.device)


def run_block(block, streams, rope, fn):
    block.zero_grad(set_to_none=True)
    x = streams.detach().requires_grad_()
    out = fn(x, rope)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("variant, backend, forward_op", [
    ("mhc", "torch", "mhc.mhc_read_res_mix.default"),
    ("hc", "torch", "mhc.apply_post_res.default"),
    pytest.param("mhc", "triton", "mhc.mhc_pre_mappings.default", marks=pytest.mark.skipif(
        not TRITON_ON_CPU, reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")),
])
def test_compiled_block_matches_eager(variant, backend, forward_op):
    import torch._dynamo

    torch._dynamo.reset()
    block, streams, rope = block_and_inputs(variant, backend)
    want = run_block(block, streams, rope, block)
    graphs = []
    compiled = torch.compile(block, backend=recording_backend(graphs), fullgraph=True, dynamic=False)
    got = run_block(block, streams, rope, compiled)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    forward_graph, backward_graph = graphs
    assert forward_op in forward_graph  # opaque: its Python was not traced
    assert forward_op.replace(".default", "_backward.default") in backward_graph


@pytest.mark.skipif(not TRITON_ON_CPU, reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")
def test_compiled_triton_connection_read_and_write():
    """A connection's read and write alone, compiled (fullgraph) with backend="triton": the
    kernels run inside the graph, as eagerly; also without grad (evaluation)."""
    import torch._dynamo
    from mhc_train.residual import ResidualConfig, build_connection

    torch._dynamo.reset()
    cfg = ResidualConfig(variant="mhc", n=2, t_max=T_MAX, backend="triton", phi_init_std=0.1)
    conn = build_connection(cfg, dim=4, layer_index=1)

    def connection(streams):
        u, mix = conn.read(streams)
        return conn.write(streams, torch.tanh(u), mix)

    compiled = torch.compile(connection, backend="aot_eager", fullgraph=True, dynamic=False)
    streams = rand(2, 1, 2, 4, seed=30)
    results = []
    for fn in (connection, compiled):
        conn.zero_grad(set_to_none=True)
        x = streams.detach().requires_grad_()
        out = fn(x)
        (out * out).sum().backward()
        results.append([out.detach(), x.grad] + [p.grad for p in conn.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(streams), connection(streams), rtol=1e-5, atol=1e-6)


def test_auto_under_compile_takes_the_choice_settled_before_tracing(monkeypatch):
    """train.compile settles residual.backend=auto eagerly (its self-test cannot run inside a
    trace); while compiling, auto then takes that choice for the device, else the reference."""
    from mhc_train.residual import backend
    from mhc_train.train.compile import settle_backend

    monkeypatch.setattr(backend, "_auto_choice", {})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert backend.resolve_backend("auto", torch.device("cpu")) == "torch"  # nothing settled yet
    backend._auto_choice["cpu"] = "triton"  # as a passed self-test on a GPU would leave it
    assert backend.resolve_backend("auto", torch.device("cpu")) == "triton"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    backend._auto_choice.clear()

    class Cfg:
        class residual:
            backend = "auto"

    assert settle_backend(Cfg, torch.device("cpu")) == "torch" and backend._auto_choice == {}  # CPU: no self-test
