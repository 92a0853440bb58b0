"""data.document_mask: packed documents attend only to themselves, with RoPE positions restarting
at each. Checked against the definition: the packed forward's logits for each document equal a
forward pass over that document alone. Without segment ids the model runs today's path.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from mhc_train.data import PackedLoader, segment_ids
from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.model import attention as attention_mod
from mhc_train.residual import ResidualConfig
from mhc_train.train.layouts import model_steps
from test_data import corpus, prepared, tok  # noqa: F401  (fixtures)

EOS = 2


def _per_document_logits(model, row: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(row[seg == k][None]).logits[0] for k in seg.unique()])


@pytest.mark.parametrize("variant", ["baseline", "mhc"])
def test_packed_forward_equals_per_document_passes(prepared, variant):  # noqa: F811
    torch.manual_seed(0)
    model = MHCTransformer(load_model_config("tiny"), ResidualConfig(variant=variant)).eval()
    # Real windows of the prepared corpus that cross a document boundary (a partial first document)...
    loader = PackedLoader(prepared, seq_len=64, batch_size=2, document_mask=True, shuffle=False)
    windows = loader.data.gather(np.arange(loader.data.num_sequences))
    crossing = np.flatnonzero((windows[:, :-2] == EOS).any(axis=1))[:2]
    inputs, targets, seg = loader.data.batch(crossing)
    assert int(seg.max()) >= 1 and torch.equal(seg, torch.from_numpy(segment_ids(inputs.numpy(), EOS)))
    # ...and a made-up row of short documents, one of them only its EOS.
    docs = [torch.cat([torch.randint(3, 512, (n,)), torch.tensor([EOS])]) for n in (5, 17, 0, 9)]
    short = torch.cat(docs)[None]
    short_seg = torch.from_numpy(segment_ids(short.numpy(), EOS))
    assert short_seg[0].tolist() == [0] * 6 + [1] * 18 + [2] + [3] * 10
    with torch.no_grad():
        for x, s in ((inputs, seg), (short, short_seg)):
            packed = model(x, segment_ids=s).logits
            for b in range(len(x)):
                torch.testing.assert_close(packed[b], _per_document_logits(model, x[b], s[b]), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(model(x).logits, packed, atol=1e-3)  # the mask does matter here
        # One document per row: the mask is the causal mask.
        one = torch.zeros_like(inputs)
        torch.testing.assert_close(model(inputs, segment_ids=one).logits, model(inputs).logits, rtol=1e-5, atol=1e-5)
    # Training through the mask, as the layouts run a step: (inputs, targets, segment_ids) batches.
    model.train()
    ce = model(inputs, targets, segment_ids=seg).ce_loss
    parts = model_steps(model, [(inputs, targets, seg)], contextlib.nullcontext,
                        lambda i, last: contextlib.nullcontext(), torch.device("cpu"))
    assert torch.equal(parts[1], ce.detach()) and all(p.grad is not None for p in model.embed.parameters())


def test_mask_off_is_todays_path(prepared, monkeypatch):  # noqa: F811
    plain = PackedLoader(prepared, seq_len=32, batch_size=3, seed=4)
    masked = PackedLoader(prepared, seq_len=32, batch_size=3, seed=4, document_mask=True)
    a, b = next(plain), next(masked)
    assert len(a) == 2 and len(b) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert plain.state_dict() == masked.state_dict()  # the same data order: a run may switch it on or off
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append(kw)
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(attention_mod.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    model = MHCTransformer(load_model_config("tiny"), ResidualConfig(variant="mhc")).eval()
    with torch.no_grad():
        assert torch.equal(model(a[0]).logits, model(a[0], segment_ids=None).logits)
    assert calls and all(kw == {"is_causal": True, "scale": model.blocks[0].attn.scale} for kw in calls)
    with pytest.raises(ValueError, match="segment_ids"):
        model(a[0], segment_ids=b[2][:, :-1])


def test_training_passes_segment_ids_to_every_forward(subprocess_env, tmp_path, monkeypatch):
    """mhc-train data.document_mask=true: train and validation batches reach the model with the
    segment ids of their windows (the loader's, for the same data order as without the mask)."""
    from test_train import run, run_dir, train_records

    from mhc_train.model import transformer

    monkeypatch.setenv("MHC_TRAIN_CACHE", subprocess_env["MHC_TRAIN_CACHE"])
    seen = []
    forward = transformer.MHCTransformer.forward

    def spy(self, tokens, targets=None, segment_ids=None, **kw):
        if targets is not None:  # training and validation (the gain report runs on tokens alone)
            seen.append((torch.is_grad_enabled(), segment_ids))
        return forward(self, tokens, targets, segment_ids=segment_ids, **kw)

    monkeypatch.setattr(transformer.MHCTransformer, "forward", spy)
    out = tmp_path / "runs"
    assert run(out, "train.steps=2", "train.eval_every=2", "data.document_mask=true") == 0
    assert len(train_records(run_dir(out))) == 2
    assert {grad for grad, _ in seen} == {True, False}  # both training and validation forwards
    assert all(seg is not None and seg.shape == (4, 32) and seg.dtype == torch.int64 for _, seg in seen)
    # segment ids as the loader numbers them: from 0 at each window's start, never decreasing
    assert all(bool((seg[:, 0] == 0).all()) and bool((seg.diff(dim=1) >= 0).all()) for _, seg in seen)


def test_document_mask_with_pipeline_stages_is_refused(tmp_path, capsys, monkeypatch):
    from test_train import run

    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; refused before any process group
    assert run(tmp_path / "runs", "data.document_mask=true", "parallel=mesh", "parallel.pp=2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: data.document_mask: not supported with pipeline"), err
