"""Every Triton kernel builds for Hopper on this CPU machine (Triton's bundled ptxas), one case per
kernel here; ``python -m mhc_train.bench.sm90_compile`` compiles all 97 cases (docs/benchmarks.md).
In a subprocess: under TRITON_INTERPRET (the tests' setting) @triton.jit gives interpreted
functions, which do not compile."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_each_kernel_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cold cache: really compiled
    proc = subprocess.run([sys.executable, "-m", "mhc_train.bench.sm90_compile", "--quick"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "sm_90: 9 / 9 kernel cases compile" in proc.stdout, proc.stdout
    assert any(tmp_path.rglob("*.cubin"))  # down to machine code, not only the front end


def test_quick_autotune_shrinks_the_search():
    """MHC_AUTOTUNE=quick (set by launch/gpu_check.sh) leaves one or two configs per kernel."""
    probe = ("import mhc_kernels.apply as a, mhc_kernels.mappings as m; "
             "print(len(a._apply_post_res_bwd_kernel.configs), len(m._mhc_proj_bwd_kernel.configs))")
    counts = {}
    for mode in ("full", "quick"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["MHC_AUTOTUNE"] = mode
        proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts[mode] = tuple(int(x) for x in proc.stdout.split())
    assert counts["quick"] == (2, 1) and min(counts["full"]) >= 8, counts
