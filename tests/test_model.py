"""The whole model: forward/backward of every variant, gradients everywhere, bad input."""

import pytest
import torch

from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.residual import ResidualConfig


@pytest.mark.parametrize("variant", ["baseline", "hc", "mhc"])
def test_forward_backward_reaches_every_parameter(variant):
    torch.manual_seed(0)
    cfg = load_model_config("tiny", seq_aux_loss_coef=1e-3, q_lora_rank=16)
    model = MHCTransformer(cfg, ResidualConfig(variant=variant))
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # HC and mHC start their dynamic weights at zero, so their gates get gradient from the
    # second step on (as in the HC paper); take one step, then require gradient everywhere.
    for _ in range(2):
        opt.zero_grad()
        out = model(tokens[:, :-1], tokens[:, 1:])
        assert out.logits.shape == (2, 32, cfg.vocab_size)
        assert torch.isfinite(out.loss) and out.aux_loss is not None
        out.loss.backward()
        opt.step()
    silent = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not silent, silent
    if variant == "mhc":
        names = {n for n, _ in model.named_parameters()}
        assert {"blocks.0.attn_conn.phi", "blocks.0.attn_conn.alpha", "blocks.0.attn_conn.bias"} <= names


@pytest.mark.parametrize("variant", ["baseline", "mhc"])
def test_loss_falls_when_fitting_a_batch(variant):
    torch.manual_seed(0)
    model = MHCTransformer(load_model_config("tiny"), ResidualConfig(variant=variant))
    tokens = torch.randint(0, 512, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        loss.backward()
        opt.step()
        model.update_router_biases()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_streams_shape_and_causality():
    torch.manual_seed(0)
    model = MHCTransformer(load_model_config("tiny"), ResidualConfig(variant="mhc", n=3)).eval()
    tokens = torch.randint(0, 512, (1, 12))
    assert model.embed_streams(tokens).shape == (1, 12, 3, 64)
    changed = tokens.clone()
    changed[0, 8] = (changed[0, 8] + 1) % 512
    a, b = model(tokens).logits, model(changed).logits
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)  # the future cannot leak back
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_bad_tokens_and_length():
    model = MHCTransformer(load_model_config("tiny"), ResidualConfig(variant="baseline"))
    with pytest.raises(ValueError, match=r"tokens must be an integer tensor \[B, S\]"):
        model(torch.rand(2, 4))
    with pytest.raises(ValueError, match="max_seq_len=128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_meta_device_builds_without_memory():
    with torch.device("meta"):
        model = MHCTransformer(load_model_config("27b"), ResidualConfig(variant="mhc"))
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 26e9


def test_each_weight_initialises_the_same_whatever_else_the_process_holds():
    """A pipeline rank materialises only its stages (the rest stays on meta): every weight it
    holds must equal the one-process value (per-weight seeded init), and the seed must matter."""
    cfg, rcfg = load_model_config("tiny"), ResidualConfig(variant="mhc")
    with torch.device("meta"):
        full, part = MHCTransformer(cfg, rcfg), MHCTransformer(cfg, rcfg)
    full.to_empty(device="cpu")
    full.init_weights(seed=7)
    held = [part.blocks[1], part.head]  # an MoE block (stacked experts, router) and the head
    for module in held:
        module.to_empty(device="cpu")
    part.init_weights(seed=7)
    assert all(p.is_meta for p in part.blocks[0].parameters())  # left alone, no memory
    for name, value in part.named_parameters():
        if not value.is_meta:
            assert torch.equal(value, full.get_parameter(name)), name
    assert any(n.startswith("blocks.1.ffn.experts") for n, p in part.named_parameters() if not p.is_meta)
    full_b = MHCTransformer(cfg, rcfg)  # another seed: other values
    full_b.init_weights(seed=8)
    assert not torch.equal(full_b.head.weight, full.head.weight)
    assert full.head.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
