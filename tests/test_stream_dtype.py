"""residual.stream_dtype: the residual streams in the run's low precision (bf16 under bf16
autocast, as in the paper) or as set, identically in every layout; the mappings stay fp32."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.weight_casts import step_region
from mhc_train.residual import ResidualConfig, activation_dtype, stream_dtype


def block_inputs(variant: str, setting: str, autocast: bool) -> set:
    torch.manual_seed(0)
    model = MHCTransformer(load_model_config("tiny"), ResidualConfig(variant=variant, stream_dtype=setting))
    seen: set = set()
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.add(args[0].dtype))
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with step_region("cpu") if autocast else torch.autocast("cpu", enabled=False):
        out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    return seen


@pytest.mark.parametrize("variant", ["baseline", "hc", "mhc"])
def test_streams_follow_the_setting(variant):
    assert block_inputs(variant, "auto", autocast=True) == {torch.bfloat16}
    assert block_inputs(variant, "auto", autocast=False) == {torch.float32}
    assert block_inputs(variant, "float32", autocast=True) == {torch.float32}


def test_the_mappings_run_in_fp32_on_bf16_streams():
    from mhc_train.residual.ops import mhc_mappings

    torch.manual_seed(0)
    model = MHCTransformer(load_model_config("tiny"), ResidualConfig(variant="mhc"))
    conn = model.blocks[0].attn_conn
    x = torch.randn(2, 3, 4, model.cfg.dim, dtype=torch.bfloat16)
    h_pre, h_post, h_res = mhc_mappings(x, conn.phi, conn.alpha, conn.bias, 20)
    assert {h.dtype for h in (h_pre, h_post, h_res)} == {torch.float32}
    assert conn.phi.dtype == torch.float32


def test_resolution_and_refusal():
    h = torch.zeros(2, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert stream_dtype("auto", h) == torch.bfloat16
    assert stream_dtype("auto", h) == torch.float32 and stream_dtype("bfloat16", h) == torch.bfloat16
    assert activation_dtype("auto", True, torch.float32) == torch.bfloat16
    assert activation_dtype("auto", False, torch.float32) == torch.float32
    assert activation_dtype("float32", True, torch.float32) == torch.float32
    with pytest.raises(ValueError, match="residual.stream_dtype: must be one of auto, float32, bfloat16"):
        ResidualConfig(stream_dtype="bf16")


def test_every_layout_has_the_same_stream_dtype_and_losses(subprocess_env):
    """One launch of 2 ranks: one process, DDP, FSDP (eager and compiled), pp=2 and DeepSpeed
    ZeRO-1 (fp32 and bf16 weights), bf16, with stream_dtype auto and float32: the same stream dtypes, and step 1 equal to
    one process (the script's docstring)."""
    script = Path(__file__).resolve().parent / "dist_scripts" / "stream_dtype_check.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env={**subprocess_env, "DS_ACCELERATOR": "cpu"}, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert out.count("ok  ") == 14, out[-4000:]


def test_the_norm_keeps_the_input_dtype_and_rounds_its_weight_to_it():
    """The sublayer input is in the stream dtype in one process too (an fp32 weight times bf16
    used to give fp32), with the values of FSDP's bf16 gather of the weight."""
    from mhc_train.norm import RMSNorm

    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8) + 1e-3)  # not representable in bf16
    x = torch.randn(3, 8)
    bf16 = norm(x.bfloat16())
    assert bf16.dtype == torch.bfloat16
    twin = RMSNorm(8).bfloat16()
    with torch.no_grad():
        twin.weight.copy_(norm.weight)
    assert torch.equal(bf16, twin(x.bfloat16()))
    assert norm(x).dtype == torch.float32
    ref = norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    torch.testing.assert_close(norm(x), ref)
