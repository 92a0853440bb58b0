"""GPU check, op timings: the memory-bound mHC ops against a measured device copy, and Sinkhorn.

Built on ``mhc_train.bench.ops`` (its op table, bytes per token, inputs, copy bandwidth and
timer): the same figures ``mhc-train-bench-ops`` prints, for the torch reference (eager) and the
Triton kernels. ``torch.compile`` of the single ops is left to ``mhc-train-bench-ops``: compiling
every op at every width would not fit the check's time; the step section compiles whole blocks.
"""

from __future__ import annotations

import torch

from mhc_train.bench import ops as bench_ops
from mhc_train.bench.gpu_kernels import stream_inputs, training_precision
from mhc_train.bench.gpu_report import one_line
from mhc_train.residual import ops

IMPLS = ("torch", "triton")


def timed(check, fn, items_left: int) -> tuple[float, int]:
    """(median seconds of one ``fn()``, spans timed): one warm span first, then as many more as
    the section's estimate still fits (``Allowance.repeats``); on CUDA a span lasts at least
    ``bench_ops.SPAN_S`` (several calls)."""
    s = check.shapes
    first = bench_ops.timeit(fn, check.device, repeats=1, warmup=s.warmup)
    span = max(first, bench_ops.SPAN_S) if check.device.type == "cuda" else first
    repeats = check.allowance.repeats(span, items_left, most=s.most_repeats, least=s.least_repeats)
    if repeats <= 1:
        return first, 1
    return bench_ops.timeit(fn, check.device, repeats, warmup=0), repeats


def run_bandwidth(check) -> dict:
    with training_precision(check.device):
        return _bandwidth(check)


def _bandwidth(check) -> dict:
    s, device = check.shapes, check.device
    tokens = s.batch * s.seq
    elt = torch.empty(0, dtype=s.stream_dtype).element_size()
    copy_numel = tokens * s.n * max(s.widths)
    copy = bench_ops.copy_bandwidth(device, s.stream_dtype, copy_numel, max(s.least_repeats, 3))
    check.say(f"bandwidth: device copy {copy / 1e9:.1f} GB/s")
    items = [(c, op, impl) for c in s.widths for op in s.bandwidth_ops for impl in IMPLS]
    rows = []
    try:
        for k, (c, op, impl) in enumerate(items):
            inputs = stream_inputs(tokens, s.n, c, device, s.stream_dtype)
            fn, bytes_per_token = bench_ops.op_table(s.n, c, s.t_max, elt)[op]
            row = {"C": c, "op": op, "impl": impl, "bytes_per_token": bytes_per_token}
            try:
                fwd, repeats = timed(check, lambda: fn(inputs, impl), 2 * (len(items) - k))
                both, _ = timed(check, bench_ops._with_backward(fn, inputs, impl), 2 * (len(items) - k) - 1)
            except Exception as exc:  # one kernel failing is a result, the rest still runs
                # (the section's cap, a SectionTimeout, is no Exception: it ends the section here)
                row["error"] = one_line(exc)
                check.say(f"bandwidth C={c} {op} {impl}: {row['error']}")
                rows.append(row)
                continue
            achieved = bytes_per_token * tokens / fwd
            row.update(fwd_ms=fwd * 1e3, fwd_bwd_ms=both * 1e3, fwd_GBps=achieved / 1e9,
                       pct_of_copy=100 * achieved / copy, repeats=repeats)
            rows.append(row)
            check.say(f"bandwidth C={c} {op} {impl}: fwd {fwd * 1e3:.3f} ms ({achieved / 1e9:.0f} GB/s, "
                      f"{100 * achieved / copy:.0f}% of copy), fwd+bwd {both * 1e3:.3f} ms")
    finally:
        stream_inputs.cache_clear()
    summary = [f"tokens = {tokens}, n = {s.n}, streams {str(s.stream_dtype).removeprefix('torch.')}; measured copy "
               f"(read + write of {copy_numel * elt / 1e6:.0f} MB): {copy / 1e9:.1f} GB/s",
               "GB/s = the fused design's bytes per token (bench/ops.py) x tokens / forward time; "
               "torch = the eager reference, triton = the kernels"]
    return {"passed": all("error" not in r for r in rows), "copy_GBps": copy / 1e9, "rows": rows, "summary": summary}


def run_sinkhorn(check) -> dict:
    s, device = check.shapes, check.device
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(s.batch, s.seq, s.n, s.n, generator=gen, device=device) * 2.0
    grad_out = torch.randn(logits.shape, generator=gen, device=device)
    rows = []
    for k, impl in enumerate(IMPLS):
        leaf = logits.detach().requires_grad_(True)

        def forward_backward(impl=impl, leaf=leaf):
            leaf.grad = None  # a fresh gradient per run, not accumulated into the last one
            torch.autograd.backward(ops.sinkhorn_knopp(leaf, s.t_max, backend=impl), grad_out)

        fwd, repeats = timed(check, lambda impl=impl: ops.sinkhorn_knopp(logits, s.t_max, backend=impl),
                             2 * (len(IMPLS) - k))
        both, _ = timed(check, forward_backward, 2 * (len(IMPLS) - k) - 1)
        rows.append({"impl": impl, "fwd_ms": fwd * 1e3, "fwd_bwd_ms": both * 1e3, "repeats": repeats})
        check.say(f"sinkhorn {impl}: fwd {fwd * 1e3:.3f} ms, fwd+bwd {both * 1e3:.3f} ms")
    speedup = rows[0]["fwd_bwd_ms"] / rows[1]["fwd_bwd_ms"]
    summary = [f"logits [b, s, n, n] = [{s.batch}, {s.seq}, {s.n}, {s.n}] fp32, t_max = {s.t_max}; "
               f"forward + backward, torch time / Triton time: {speedup:.2f}x"]
    return {"passed": True, "rows": rows, "torch_over_triton_fwd_bwd": speedup, "summary": summary}
