"""The byte counter of ``mhc-train-bench-ops --bytes`` (mhc_train/bench/byte_count.py): counts
of trivial kernels and ops equal the hand count, and the fused kernels move the bytes their
design says (the write at exactly the minimum; the read's backward x twice, g_u twice)."""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from mhc_kernels._common import is_interpreted  # noqa: E402
from mhc_train.bench import byte_count  # noqa: E402


@triton.jit
def _masked_copy(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=ok, other=0.0), mask=ok)
    if tl.program_id(0) == 0:
        tl.store(dst, tl.load(src))  # an unmasked scalar re-read and re-write


if not is_interpreted(_masked_copy):
    pytest.skip("counting needs TRITON_INTERPRET=1 (set by tests/conftest.py on CPU)", allow_module_level=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_counts_active_lanes_times_element_size(dtype):
    src, dst = torch.randn(20).to(dtype), torch.zeros(20, dtype=dtype)
    with byte_count.count_triton(dict(src=src, dst=dst)) as traffic:
        _masked_copy[(2,)](src, dst, 20, BLOCK=16)  # 32 lanes, 20 active, + 1 scalar
    e = src.element_size()
    assert traffic.reads == {"src": 21 * e}
    assert traffic.writes == {"dst": 21 * e}
    assert torch.equal(dst, src)


def test_torch_counts_inputs_and_outputs_not_views():
    a, b = torch.randn(10), torch.randn(10)
    out = torch.empty(10)
    with byte_count.count_torch(dict(a=a, b=b, out=out)) as traffic:
        c = a + b  # reads 80, writes 40
        c.view(2, 5).t()  # views: nothing
        torch.mul(a, 2.0, out=out)  # reads a (40), writes out (40)
        out.copy_(b)  # reads b, writes out
        out.zero_()  # writes out
    assert traffic.reads == {"a": 80, "b": 80}
    assert traffic.writes["out"] == 120 and traffic.written == 160


def test_post_res_kernels_move_exactly_the_minimum():
    n, c, tokens = 4, 32, 16
    rows = byte_count.count_ops(n, c, tokens, torch.bfloat16, 4, ("triton",), ("apply_post_res",))
    for r in rows:
        # (n+1)C reads + nC writes (forward), (2n+1)C + (n+1)C (backward), + the coefficients
        assert (r["read"], r["written"]) == (r["min_read"], r["min_written"]), r
        assert r["param_read"] == 0
    fwd = rows[0]
    assert fwd["reads_by_tensor"] == {"x": n * c * 2, "y": c * 2, "h_post": n * 4, "h_res": n * n * 4}


def test_read_backward_reads_x_twice_and_g_u_twice():
    n, c, tokens = 4, 32, 16
    (fwd, bwd) = byte_count.count_ops(n, c, tokens, torch.bfloat16, 4, ("triton",), ("pre_mappings",))
    assert fwd["reads_by_tensor"]["x"] == 2 * n * c * 2  # mappings pass + H_pre x pass
    assert bwd["reads_by_tensor"]["x"] == 2 * n * c * 2  # x . g_u pass + grad_x / grad_phi pass
    assert bwd["reads_by_tensor"]["g_u"] == 2 * c * 2
    assert bwd["writes_by_tensor"]["new[16,4,32]"] == n * c * 2  # grad_x once
    assert bwd["reads_by_tensor"]["h_pre"] <= 8 * n * 4  # per token block / K slice, not per element


def test_torch_backend_counts_eager_traffic_above_the_minimum():
    rows = byte_count.count_ops(2, 16, 8, torch.float32, 3, ("torch",), ("apply_pre",))
    for r in rows:
        assert r["read"] >= r["min_read"] and r["written"] >= r["min_written"]


def test_bench_ops_bytes_prints_the_table_and_writes_json(tmp_path, capsys):
    import json

    from mhc_train.bench import ops

    out = tmp_path / "bytes.json"
    with pytest.raises(SystemExit) as done:
        ops.main(["--bytes", "--count-dim", "16", "--tokens", "8", "--t-max", "3", "--json", str(out)])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "| apply_post_res | bwd | triton |" in printed and "| pre_mappings | fwd | torch |" in printed
    data = json.loads(out.read_text())
    assert "mhc-train-bench-ops --bytes" in data["meta"]["command"]
    assert {(r["op"], r["direction"], r["backend"]) for r in data["rows"]} == {
        (op, d, b) for op in (*byte_count.OPS, "connection") for d in ("fwd", "bwd") for b in ("triton", "torch")}


def test_the_documented_byte_table_is_the_committed_json():
    """docs/benchmarks.md's table is generated from docs/data/bench_bytes.json (byte_count.table)."""
    import json
    from pathlib import Path

    from mhc_train.bench.byte_count import table

    root = Path(__file__).resolve().parents[1]
    rows = json.loads((root / "docs/data/bench_bytes.json").read_text())["rows"]
    doc = (root / "docs/benchmarks.md").read_text()
    start, end = doc.index("<!-- bench-bytes-table -->\n"), doc.index("\n<!-- /bench-bytes-table -->")
    assert doc[start + len("<!-- bench-bytes-table -->\n"):end] == table(rows)
