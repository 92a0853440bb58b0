"""DeepSeekMoE: vectorised dispatch against a per-token loop, routing rule, balancing; grouped GEMM
against the per-expert loop; the dispatcher interface; no host sync without expert parallelism."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils._python_dispatch import TorchDispatchMode

from mhc_train.model import load_model_config
from mhc_train.model.config import ModelConfig
from mhc_train.model.moe import (LocalDispatcher, MoE, RoutedExperts, Router, count_per_expert, grouped_mm_supported,
                                 sort_by_expert)


def make_moe(**kw):
    torch.manual_seed(0)
    cfg = load_model_config("tiny", **kw)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    return moe


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the routing rule written out."""
    cfg = moe.cfg
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        scores = torch.sigmoid(moe.router.weight @ x[t])
        chosen = torch.topk(scores + moe.router.expert_bias, cfg.n_activated_experts).indices
        gates = scores[chosen]
        gates = gates / gates.sum() * cfg.route_scale
        for g, e in zip(gates, chosen):
            h = F.silu(moe.experts.w1[e] @ x[t]) * (moe.experts.w3[e] @ x[t])
            out[t] += g * (moe.experts.w2[e] @ h)
        if moe.shared is not None:
            out[t] += moe.shared(x[t])
    return out


@pytest.mark.parametrize("kw", [{}, {"route_scale": 2.5, "n_shared_experts": 0}, {"n_activated_experts": 8}])
def test_dispatch_matches_per_token_reference(kw):
    moe = make_moe(**kw).eval()
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.randn(8) * 0.5)  # bias changes the choice only
    x = torch.randn(2, 9, 64)
    got = moe(x)
    want = naive_moe(moe, x.view(-1, 64)).view_as(x)
    assert torch.allclose(got, want, atol=1e-5)


def test_gradients_flow_to_router_and_experts():
    moe = make_moe().train()
    moe(torch.randn(3, 5, 64)).pow(2).sum().backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bias_update_reduces_synthetic_imbalance():
    moe = make_moe().train()
    x = torch.randn(256, 64) + 1.0
    with torch.no_grad():
        moe.router.weight[0] = 3.0 * x.mean(0) / x.mean(0).norm()  # expert 0 attracts most tokens
    def imbalance():
        moe.router.expert_load.zero_()
        moe(x)
        load = moe.router.expert_load.clone()
        return (load.max() / load.mean()).item()

    start = imbalance()
    for _ in range(300):
        moe.router.expert_load.zero_()
        moe(x)
        moe.router.update_bias(speed=0.01)
    end = imbalance()
    assert start > 3.0 and end < 1.3, (start, end)  # max load / mean load
    assert moe.router.expert_bias[0] < 0  # the over-loaded expert is pushed down


def test_load_is_counted_only_in_training():
    moe = make_moe()
    moe.eval()(torch.randn(1, 4, 64))
    assert moe.router.expert_load.sum() == 0
    moe.train()(torch.randn(1, 4, 64))
    assert moe.router.expert_load.sum() == 4 * 2  # tokens x top-k


def test_sequence_balance_loss():
    moe = make_moe(seq_aux_loss_coef=0.1).train()
    moe(torch.randn(2, 6, 64))
    assert moe.aux_loss is not None and moe.aux_loss > 0
    # Perfectly uniform scores and loads give f_i = 1, P_i = 1/E: loss = coef * 1.
    e, k, s = 8, 2, 4
    scores = torch.full((s, e), 0.5)
    indices = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    loss = moe._sequence_balance_loss(scores, indices, (1, s, 64))
    assert torch.allclose(loss, torch.tensor(0.1))
    plain = make_moe().train()  # coefficient 0 (the default): no sequence-wise loss after a forward
    plain(torch.randn(1, 3, 64))
    assert plain.aux_loss is None


@pytest.mark.parametrize("kw,field", [
    ({"n_activated_experts": 9}, "model.n_activated_experts"),
    ({"qk_rope_head_dim": 32}, "model.qk_rope_head_dim"),
    ({"qk_rope_head_dim": 7}, "model.qk_rope_head_dim"),
    ({"n_dense_layers": 4}, "model.n_dense_layers"),
    ({"dim": 0}, "model.dim"),
])
def test_bad_model_config(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_model_config("tiny", **kw)


def test_unknown_field_and_size():
    with pytest.raises(ValueError, match="model.n_layer: unknown field"):
        load_model_config("tiny", n_layer=3)
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        load_model_config("huge")
    assert ModelConfig().ffn_dim_dense == 8 * 896


# ------------------------------------------------------------------ grouped GEMM against the loop

def step(moe: MoE, x: torch.Tensor, impl: str, run=None) -> dict[str, torch.Tensor]:
    """Output and every gradient (input and parameters) of one forward + ``sum().backward()``: the
    sum hands the MoE an expanded (stride-0) gradient, which ``_grouped_mm`` itself rejects.
    ``run`` calls the MoE (a compiled wrapper of it); default the MoE itself."""
    moe.experts.impl = impl
    moe.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = (moe if run is None else run)(x)
    out.sum().backward()
    grads = {name: p.grad for name, p in moe.named_parameters()}
    return {"out": out.detach(), "x.grad": x.grad, **grads}


def assert_same(got: dict, want: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_near(got: dict, want: dict, rel: float) -> None:
    """Each tensor within ``rel`` of the reference in norm (bf16 against fp32 or another bf16 order)."""
    assert got.keys() == want.keys()
    for name, value in want.items():
        err = (got[name].float() - value.float()).norm() / value.float().norm()
        assert err < rel, (name, err.item())


ROUTINGS = {  # expert_bias forces the choice: sigmoid scores lie in (0, 1)
    "uneven": ({}, lambda b: b.copy_(torch.randn(8) * 0.5)),
    "empty": ({}, lambda b: b.index_fill_(0, torch.tensor([1, 4, 5]), -10.0)),
    "one expert": ({"n_activated_experts": 1}, lambda b: b[3].fill_(10.0)),
}


@pytest.mark.parametrize("routing", ROUTINGS)
def test_grouped_matches_loop_forward_and_all_gradients(routing):
    kw, set_bias = ROUTINGS[routing]
    moe = make_moe(**kw).train()
    with torch.no_grad():
        set_bias(moe.router.expert_bias)
    x = torch.randn(2, 11, 64)
    _, indices, _ = moe.router(x.view(-1, 64))
    loads = count_per_expert(indices.flatten(), 8)
    if routing == "empty":
        assert (loads[[1, 4, 5]] == 0).all() and loads.sum() == 22 * 2
    if routing == "one expert":
        assert loads[3] == 22 and loads.sum() == 22
    assert grouped_mm_supported(x.view(-1, 64), moe.experts.w1)
    assert_same(step(moe, x, "grouped"), step(moe, x, "loop"))
    assert_same(step(moe, x, "auto"), step(moe, x, "loop"))


@pytest.mark.parametrize("offsets", [[0, 0, 5, 5, 9, 9, 12, 12], [12] * 8, [0] * 7 + [12], [0] * 8])
def test_experts_on_hand_made_groups(offsets):
    """Repeated offsets (empty experts), everything in the first or the last expert, no rows."""
    experts = make_moe().experts
    x = torch.randn(offsets[-1], 64, requires_grad=True)
    offs = torch.tensor(offsets, dtype=torch.int32)
    results = []
    for impl in ("grouped", "loop"):
        experts.impl = impl
        experts.zero_grad(set_to_none=True)
        x.grad = None
        y = experts(x, offs)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y.detach(), x.grad] + [p.grad for p in experts.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_loop_when_strides_are_not_16_byte_multiples():
    for kw in ({"dim": 6, "n_heads": 1}, {"moe_ffn_dim": 6}):  # 24-byte fp32 rows: C, then F
        moe = make_moe(**kw).train()
        c = moe.cfg.dim
        x = torch.randn(2, 5, c)
        assert not grouped_mm_supported(x.view(-1, c), moe.experts.w1)
        with pytest.raises(RuntimeError, match="16 bytes"):
            step(moe, x, "grouped")
        assert_same(step(moe, x, "auto"), step(moe, x, "loop"))
    eight = torch.randn(2, 8, 8, dtype=torch.bfloat16)  # 16-byte bf16 rows, 32-byte fp32 rows
    assert grouped_mm_supported(eight[0], eight) and grouped_mm_supported(eight[0].float(), eight.float())
    assert not grouped_mm_supported(eight[0].double(), eight.double())
    moe.experts.impl = "fast"
    with pytest.raises(ValueError, match="impl"):
        moe(x)


def test_bf16_autocast_runs_grouped_and_is_close_to_fp32():
    moe = make_moe().train()
    x = torch.randn(2, 9, 64)
    want = step(moe, x, "loop")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert grouped_mm_supported(x.view(-1, 64), moe.experts.w1)
        with OpRecorder() as ops:
            got = step(moe, x, "auto")
    assert "aten._grouped_mm.default" in ops.seen
    assert all(value.dtype == torch.float32 for value in got.values())  # combined in x's dtype, as before
    assert_near(got, want, rel=2e-2)


# ------------------------------------------------------------------------------ the dispatcher

def test_dispatch_then_combine_of_identity_experts():
    torch.manual_seed(1)
    t, k, e, c = 13, 3, 6, 4
    x = torch.randn(t, c)
    indices = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    indices[:5] = torch.tensor([0, 2, 5])  # uneven; experts 1, 3, 4 light or empty
    weights = torch.rand(t, k)
    x_grouped, offsets, ctx = LocalDispatcher().dispatch(x, indices, e)
    assert offsets.dtype == torch.int32 and offsets.device == x.device and offsets[-1] == t * k
    counts = torch.bincount(indices.flatten(), minlength=e)
    assert torch.equal(offsets, counts.cumsum(0).to(torch.int32))
    assert torch.equal(count_per_expert(indices.flatten(), e), counts)
    starts = offsets - counts
    for expert in range(e):  # each group holds exactly the tokens routed to it, in token order
        rows = x_grouped[starts[expert]:offsets[expert]]
        tokens = (indices == expert).any(-1).nonzero().flatten()
        assert torch.equal(rows, x[tokens])
    out = LocalDispatcher().combine(x_grouped, weights, ctx)
    torch.testing.assert_close(out, weights.sum(-1, keepdim=True) * x)
    sorted_ = sort_by_expert(x, indices, e)
    assert torch.equal(sorted_.token_of, sorted_.order // k) and sorted_.num_tokens == t
    assert torch.equal(indices.flatten()[sorted_.order], indices.flatten().sort(stable=True).values)


def test_dispatcher_is_a_plain_attribute():
    moe = make_moe()
    assert isinstance(moe.dispatcher, LocalDispatcher)
    assert "dispatcher" not in dict(moe.named_modules()) and "dispatcher" not in moe.state_dict()
    names = {n: tuple(p.shape) for n, p in moe.experts.named_parameters()}
    assert names == {"w1": (8, 32, 64), "w3": (8, 32, 64), "w2": (8, 64, 32)}  # checkpoints depend on them


# ----------------------------------------------------------------------------------- no host sync

class OpRecorder(TorchDispatchMode):
    """Records every aten op (forward and backward: CPU autograd runs on this thread)."""

    def __init__(self, forbidden: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.seen: set[str] = set()
        self.forbidden = forbidden

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.forbidden:
            raise AssertionError(f"host sync: {func}")
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_host_reads(monkeypatch):
    """Fails on every read of a tensor's values by the host: .item()/int()/bool() go through
    aten._local_scalar_dense; .tolist() reads the data directly, so it is patched."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("host sync: Tensor.tolist/item")

    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    return lambda: OpRecorder(forbidden=("aten._local_scalar_dense.default",))


def test_no_host_read_in_forward_and_backward(no_host_reads):
    moe = make_moe(seq_aux_loss_coef=0.01).train()
    x = torch.randn(2, 7, 64)
    with no_host_reads() as ops:
        step(moe, x, "auto")
    assert {"aten._grouped_mm.default", "aten.silu_backward.default"} <= ops.seen  # the backward ran in the mode
    with pytest.raises(AssertionError, match="host sync"), no_host_reads():  # the check can fail
        step(moe, x, "loop")


def host_values(gm: torch.fx.GraphModule) -> list[str]:
    """Nodes of an aten graph that need a tensor's values on the host: a scalar read (.item(),
    .tolist()) or a shape that depends on data (bincount, nonzero, split by counts)."""
    return [node.format_node() for node in gm.graph.nodes
            if node.target is torch.ops.aten._local_scalar_dense.default
            or free_unbacked_symbols(node.meta.get("val"))]


def test_traced_forward_and_backward_read_nothing_on_the_host():
    """Traced by torch.compile (dynamo + AOTAutograd) into one forward and one backward graph. This
    torch captures .tolist()/.item() inside the graph (as _local_scalar_dense, unbacked sizes), so
    fullgraph alone proves nothing: the graphs are searched for them. bf16: the meta kernel of
    _grouped_mm (what tracing runs) accepts only bf16."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def traced(impl):
        graphs.clear()
        torch._dynamo.reset()
        compiled = torch.compile(moe, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
        try:
            return step(moe, x, impl, run=compiled), [host_values(gm) for gm in graphs]
        finally:
            torch._dynamo.reset()

    moe = make_moe(seq_aux_loss_coef=0.01).train().to(torch.bfloat16)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    want = step(moe, x, "auto")
    load = moe.router.expert_load.clone()
    got, found = traced("auto")
    assert found == [[], []], found  # forward, backward
    assert_same(got, want, rtol=0, atol=0)
    assert torch.equal(moe.router.expert_load, 2 * load)  # the load count ran in the graph
    assert any(node.target is torch.ops.aten._grouped_mm.default for node in graphs[1].graph.nodes)
    _, found = traced("loop")  # the check can fail
    assert found[0], "the loop's .tolist() should be visible in the traced forward"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_sync_on_cuda():
    moe = make_moe(seq_aux_loss_coef=0.01).train().cuda().to(torch.bfloat16)
    x = torch.randn(4, 64, 64, device="cuda", dtype=torch.bfloat16)
    if not grouped_mm_supported(x.view(-1, 64), moe.experts.w1):
        pytest.skip("no sync-free grouped GEMM on this GPU (bf16 kernel needs sm90 / sm100)")
    want = step(moe, x, "loop")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = step(moe, x, "auto")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_near(got, want, rel=2e-2)


def test_routing_runs_in_fp32_under_autocast():
    """Autocast would run the router's linear in bf16 despite the .float() casts; routing must
    see the fp32 scores (DeepSeek-V3 routes in fp32)."""
    cfg = load_model_config("tiny")
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(64, cfg.dim)
    plain = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = router(x)
    for a, b in zip(plain, under):
        assert torch.equal(a, b)


def test_grad_scale_multiplies_only_the_expert_weight_gradients():
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(16, cfg.dim)
    grads = []
    for scale in (1.0, 0.25):
        moe.zero_grad()
        moe.experts.grad_scale = scale
        moe(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in moe.named_parameters()})
    for name, g in grads[0].items():
        factor = 0.25 if name.startswith("experts.") else 1.0
        torch.testing.assert_close(grads[1][name], g * factor)
