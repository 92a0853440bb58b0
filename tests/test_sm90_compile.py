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
