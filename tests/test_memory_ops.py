"""Memory-saving ops of the model: MLA with head dims padded for SDPA's flash backend, and the
chunked cross-entropy (mhc_train/model/chunked_loss.py). Each equals the path it replaces."""

import pytest
import torch
import torch.nn.functional as F

from mhc_train.bench.loss_memory import measure
from mhc_train.model import MHCTransformer, ModelConfig, load_model_config
from mhc_train.model.attention import MLA, attend, document_mask, flash_wants_padding
from mhc_train.model.chunked_loss import chunked_cross_entropy
from mhc_train.model.rope import document_positions, rope_angles, rope_angles_at
from mhc_train.residual import ResidualConfig

# ------------------------------------------------------------------------------ MLA padding


def mla_config(q_lora_rank: int, **dims) -> ModelConfig:
    # d_qk = 24 + 8 = 32 against d_v = 16: the shape of the paper's 192 / 128, small.
    sizes = dict(dim=48, n_heads=3, qk_nope_head_dim=24, qk_rope_head_dim=8, v_head_dim=16, kv_lora_rank=20)
    sizes.update(dims)
    return ModelConfig(vocab_size=64, n_routed_experts=2, n_activated_experts=1, q_lora_rank=q_lora_rank,
                       norm_eps=1e-6, **sizes)


def run_mla(mla: MLA, x: torch.Tensor, rope, mask, pad: bool):
    mla.pad_head_dims = pad
    mla.zero_grad()
    x = x.detach().requires_grad_()
    out = mla(x, rope, mask)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()  # an uneven upstream gradient
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in mla.named_parameters()}


@pytest.mark.parametrize("q_lora_rank", [0, 12])
@pytest.mark.parametrize("with_mask", [False, True], ids=["causal", "document_mask"])
def test_padded_mla_equals_plain_mla(q_lora_rank, with_mask):
    torch.manual_seed(0)
    cfg = mla_config(q_lora_rank)
    mla = MLA(cfg)
    b, s = 2, 24
    x = torch.randn(b, s, cfg.dim)
    if with_mask:
        segments = torch.tensor([[0] * 10 + [1] * 9 + [2] * 5, [0] * 24])
        mask = document_mask(segments)
        rope = rope_angles_at(document_positions(segments), cfg.qk_rope_head_dim, cfg.rope_theta)
    else:
        mask, rope = None, rope_angles(s, cfg.qk_rope_head_dim, cfg.rope_theta)
    out, gx, grads = run_mla(mla, x, rope, mask, pad=False)
    out_p, gx_p, grads_p = run_mla(mla, x, rope, mask, pad=True)
    # Padding moves SDPA to another CPU kernel (math -> fused): equal up to fp32 rounding of
    # sums taken in another order, i.e. a few 1e-7 of each tensor's scale.
    for name, a, b in [("out", out_p, out), ("d x", gx_p, gx), *((n, grads_p[n], grads[n]) for n in grads)]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6 * b.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_attend_pads_whichever_head_dim_is_smaller():
    # v wider than q/k: q and k get the zeros, the explicit scale keeps their dot products.
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 12)
    for args in [(None, 0.3), (document_mask(torch.tensor([[0] * 4 + [1] * 5] * 2)), 0.3)]:
        torch.testing.assert_close(attend(q, k, v, *args, pad=True), attend(q, k, v, *args), rtol=1e-5, atol=1e-6)
        assert attend(q, k, v, *args, pad=True).shape == v.shape


def test_padding_is_chosen_only_where_flash_can_run():
    q = torch.randn(1, 2, 4, 192)
    assert not flash_wants_padding(q, None)  # CPU: today's kernel, today's bits
    assert not flash_wants_padding(q.bfloat16(), None)
    assert MLA(mla_config(0)).pad_head_dims is None  # decided per call by default


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mla_runs_on_the_flash_backend_on_cuda():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    cfg = mla_config(0, dim=256, n_heads=4, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                     kv_lora_rank=64)  # the paper's head dims
    mla = MLA(cfg).cuda().bfloat16()
    x = torch.randn(2, 256, cfg.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rope = rope_angles(256, cfg.qk_rope_head_dim, cfg.rope_theta, device="cuda")
    with torch.no_grad():
        reference = mla(x, rope)  # SDPA's own choice of kernel (pad_head_dims None: padded)
    assert flash_wants_padding(torch.empty(1, device="cuda", dtype=torch.bfloat16), None)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # only flash allowed: raises if it cannot run
        out = mla(x, rope)
        out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.detach(), reference, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------- chunked cross-entropy


def loss_and_grads(fn, hidden, weight, targets):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = fn(hidden, weight, targets)
    (loss * 0.7).backward()  # an upstream gradient other than 1
    return loss.detach(), hidden.grad, weight.grad


def plain_loss(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float().flatten(0, -2), targets.flatten(), ignore_index=-100)


def test_chunked_cross_entropy_equals_the_plain_loss():
    torch.manual_seed(0)
    hidden = torch.randn(3, 37, 16)  # 111 tokens: chunks of 8 leave 7
    weight = torch.randn(50, 16) * 0.5
    targets = torch.randint(0, 50, (3, 37))
    targets[torch.rand(3, 37) < 0.3] = -100
    targets[0, :8] = -100  # one whole chunk ignored
    ref = loss_and_grads(plain_loss, hidden, weight, targets)
    got = loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, 8), hidden, weight, targets)
    for a, b, name in zip(got, ref, ["loss", "d hidden", "d weight"]):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert (got[1][0, :8] == 0).all()  # ignored tokens get no gradient


def test_chunked_cross_entropy_edge_cases():
    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 8), torch.randn(20, 8)
    targets = torch.randint(0, 20, (10,))
    # One chunk larger than the batch, and chunks of one token.
    for chunk in (1, 64):
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, targets, chunk),
                                   plain_loss(hidden, weight, targets))
    # Every token ignored: nan, as F.cross_entropy's mean over nothing.
    assert chunked_cross_entropy(hidden, weight, torch.full((10,), -100), 4).isnan()
    with pytest.raises(RuntimeError):  # a target outside the vocabulary fails, as the plain loss does
        chunked_cross_entropy(hidden, weight, torch.full((10,), 20), 4)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_cross_entropy(hidden, weight, targets, 0)


def test_chunked_cross_entropy_under_autocast_follows_the_linear():
    # bf16 autocast: the head's Linear computes bf16 logits from bf16 copies; so does the chunked
    # loss, and the fp32 parameters get fp32 gradients through the casts.
    torch.manual_seed(0)
    hidden, weight = torch.randn(40, 32), torch.randn(96, 32) * 0.2
    targets = torch.randint(0, 96, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = loss_and_grads(lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t), hidden, weight, targets)
        got = loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, 16), hidden, weight, targets)
    for a, b, name in zip(got, ref, ["loss", "d hidden", "d weight"]):
        assert a.dtype == b.dtype == torch.float32, name
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3, msg=lambda m, name=name: f"{name}: {m}")


def tiny_pair(chunk: int, variant: str):
    cfg = load_model_config("tiny", seq_aux_loss_coef=1e-3)
    torch.manual_seed(0)
    plain = MHCTransformer(cfg, ResidualConfig(variant=variant))
    chunked = MHCTransformer(load_model_config("tiny", seq_aux_loss_coef=1e-3, loss_chunk_tokens=chunk),
                             ResidualConfig(variant=variant))
    chunked.load_state_dict(plain.state_dict())
    return plain, chunked


@pytest.mark.parametrize("variant", ["baseline", "mhc"])
def test_model_with_chunked_loss_trains_as_the_plain_one(variant):
    plain, chunked = tiny_pair(13, variant)
    tokens = torch.randint(0, 512, (2, 21), generator=torch.Generator().manual_seed(3))
    targets = tokens[:, 1:].clone()
    targets[1, -5:] = -100  # padding at the end of a row
    a = plain(tokens[:, :-1], targets)
    b = chunked(tokens[:, :-1], targets)
    assert b.logits is None and a.logits is not None  # the chunked path never makes them
    torch.testing.assert_close(b.ce_loss, a.ce_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), chunked.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    # Without targets (generation, export, gain reports) the logits are still there.
    assert torch.equal(chunked(tokens).logits, plain(tokens).logits)


def test_chunked_loss_is_off_by_default_and_validated():
    assert ModelConfig().loss_chunk_tokens == 0
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        load_model_config("tiny", loss_chunk_tokens=-1)


def test_chunked_loss_peak_memory_is_a_fraction_of_the_plain_one():
    # The benchmark's measurement (a fresh process each, resident-set high-water), small enough
    # for the suite: 1024 tokens x 32k vocabulary = 128 MiB per fp32 copy of the logits.
    args = dict(vocab=32768, tokens=1024, dim=64, dtype="fp32", threads=1)
    plain = measure("plain", chunk=0, **args)
    chunked = measure("chunked", chunk=128, **args)
    assert abs(plain["loss_value"] - chunked["loss_value"]) < 1e-4
    logits_mib = plain["logits_fp32_mib"]
    assert plain["peak_mib"] > 2 * logits_mib  # the plain loss holds several [N, V] fp32 tensors
    assert chunked["peak_mib"] < 0.25 * plain["peak_mib"], (chunked, plain)


def test_chunked_loss_with_pipeline_stages_is_refused(tmp_path, capsys, monkeypatch):
    from test_train import run

    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; refused before any process group
    assert run(tmp_path / "runs", "model.loss_chunk_tokens=64", "parallel=mesh", "parallel.pp=2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: model.loss_chunk_tokens: not supported with pipeline"), err


def test_benchmarks_doc_shows_the_recorded_loss_memory():
    """docs/benchmarks.md's loss-memory table is the one docs/data/bench_loss_memory.json holds."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = json.loads((root / "docs" / "data" / "bench_loss_memory.json").read_text())
    doc = (root / "docs" / "benchmarks.md").read_text()
    assert data["command"] in doc
    shown = {(int(v.replace(",", "")), kind.strip(), int(mib))
             for v, kind, mib in re.findall(r"^\| ([\d,]+) \| (plain|chunked, \d+ tokens) \| (\d+) \|", doc, re.M)}
    recorded = {(r["vocab"], "plain" if r["chunk"] is None else f"chunked, {r['chunk']} tokens", round(r["peak_mib"]))
                for r in data["results"]}
    assert shown == recorded
