"""Per-op benchmark of the mHC ops at the paper's shapes: time, bytes moved per token and achieved
bandwidth against a measured copy, for each implementation side by side.

    python -m mhc_train.bench.ops [--dims 1280,1920,2560] [--n 4] [--tokens 4096]
                                  [--impls torch,compile,triton] [--dtype bf16|fp32]

Implementations: ``torch`` (the reference ops, eager), ``compile`` (the same under
``torch.compile``), ``triton`` (the fused kernels; CUDA only, or anywhere under
TRITON_INTERPRET=1 where the figures mean nothing). Each op is timed forward and
forward+backward; ``layer`` is one whole mHC sublayer's connection work (read + write) with an
identity F. Bytes per token count the unavoidable traffic of the fused design (paper Table 2 and
section 4.3.1): a memory-bound kernel can at best move them at the copy bandwidth.
Paste the output into docs/benchmarks.md with the device.

``--bytes`` prints instead the bytes per token each backend moves, counted (not assumed), per op
and direction, against the minimum (``mhc_train/bench/byte_count.py``; the Triton kernels are
counted under Triton's interpreter, so it runs without a GPU):

    mhc-train-bench-ops --bytes [--json docs/data/bench_bytes.json] [--count-dim 256] [--tokens 64]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

from mhc_train.residual import ops

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# On CUDA a timed span holds k back-to-back calls between two events, k chosen so that the span
# lasts about SPAN_S (at most MAX_CALLS calls): one call timed alone carries the Python dispatch,
# the launch and a sync (~50-100 us), which understates the GB/s of small kernels by 30-40%.
SPAN_S = 5e-3
MAX_CALLS = 100


def timeit(fn, device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of one ``fn()`` over ``repeats`` timed spans (one call each on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if torch.device(device).type == "cuda":
        return _cuda_timeit(fn, repeats)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calls_per_span(seconds_per_call: float) -> int:
    """Back-to-back calls that fill a span of ``SPAN_S``, between 1 and ``MAX_CALLS``."""
    return max(1, min(MAX_CALLS, math.ceil(SPAN_S / max(seconds_per_call, 1e-9))))


def _cuda_timeit(fn, repeats: int) -> float:
    def span(calls: int) -> float:  # seconds per call, by CUDA events (no sync between calls)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls

    calls = calls_per_span(span(1))
    return statistics.median(span(calls) for _ in range(repeats))


def copy_bandwidth(device, dtype, numel: int, repeats: int) -> float:
    """Bytes/s of a plain device copy (read + write) of ``numel`` elements."""
    src = torch.empty(numel, device=device, dtype=dtype).uniform_()
    dst = torch.empty_like(src)
    seconds = timeit(lambda: dst.copy_(src), device, repeats)
    return 2 * numel * src.element_size() / seconds


def make_inputs(tokens: int, n: int, c: int, device, dtype):
    """Seeded random inputs drawn on ``device`` itself (drawing the 1e9 normals of the largest
    width on the host and copying them took ~10 s); on CPU the same values every run."""
    g = torch.Generator(device=device).manual_seed(0)
    width = n * n + 2 * n

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    def uniform(*shape):
        return torch.rand(*shape, generator=g, device=device)

    return dict(
        x=rnd(tokens, n, c), y=rnd(tokens, c),
        phi=rnd(n * c, width, scale=0.02, dt=torch.float32),
        alpha=torch.full((3,), 0.01, device=device), bias=rnd(width, dt=torch.float32),
        h_pre=uniform(tokens, n), h_post=uniform(tokens, n) * 2,
        h_res=torch.softmax(rnd(tokens, n, n, dt=torch.float32), -1),
    )


def op_table(n: int, c: int, t_max: int, elt: int):
    """name -> (forward callable factory, bytes per token moved by a fused kernel)."""
    f32 = 4
    w = n * n + 2 * n
    return {
        "mappings": (lambda i, b: ops.mhc_mappings(i["x"], i["phi"], i["alpha"], i["bias"], t_max, backend=b),
                     n * c * elt + (2 * n + n * n) * f32),
        "sinkhorn": (lambda i, b: ops.sinkhorn_knopp(i["h_res"], t_max, backend=b), 2 * n * n * f32),
        "apply_pre": (lambda i, b: ops.apply_pre(i["x"], i["h_pre"], backend=b), (n * c + c) * elt + n * f32),
        "apply_post_res": (lambda i, b: ops.apply_post_res(i["x"], i["y"], i["h_post"], i["h_res"], backend=b),
                           ((n + 1) * c + n * c) * elt + (n + n * n) * f32),
        "pre_mappings": (lambda i, b: ops.mhc_pre_mappings(i["x"], i["phi"], i["alpha"], i["bias"], t_max, backend=b),
                         (n * c + c) * elt + (2 * n + n * n) * f32),
        "layer": (lambda i, b: _layer(i, t_max, b), (n * c + c + (n + 1) * c + n * c) * elt + w * f32),
    }


def _layer(i, t_max, backend):
    u, _, h_post, h_res = ops.mhc_pre_mappings(i["x"], i["phi"], i["alpha"], i["bias"], t_max, backend=backend)
    return ops.apply_post_res(i["x"], u, h_post, h_res, backend=backend)


def _with_backward(fn, inputs, backend):
    """``fn`` forward + backward, for timing. Every run starts from ``.grad = None`` (as a
    training step after ``zero_grad``): accumulating into the previous runs' gradients would add
    a read + write of each of them. The output gradients (ones) are made once, outside the runs."""
    leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    grad_outputs = []

    def run():
        for leaf in leaves.values():
            leaf.grad = None
        out = fn(leaves, backend)
        outs = out if isinstance(out, tuple) else (out,)
        if not grad_outputs:
            grad_outputs.extend(torch.ones_like(o) for o in outs)
        torch.autograd.backward(list(outs), grad_outputs)

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="1280,1920,2560")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--t-max", type=int, default=20)
    p.add_argument("--tokens", type=int, default=None, help="tokens per call (default 16384 on CUDA, 2048 on CPU)")
    p.add_argument("--impls", default=None, help="default: torch,compile,triton on CUDA; torch on CPU")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--ops", default="mappings,sinkhorn,apply_pre,apply_post_res,pre_mappings,layer")
    p.add_argument("--bytes", action="store_true", help="count the bytes per token each backend moves instead")
    p.add_argument("--count-dim", type=int, default=256, help="C of the --bytes runs (interpreted: keep it small)")
    p.add_argument("--json", default=None, help="with --bytes: also write the counts here as JSON")
    args = p.parse_args(argv)
    if args.bytes:
        sys.exit(_count_bytes(args))

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tokens = args.tokens or (16384 if cuda else 2048)
    impls = (args.impls or ("torch,compile,triton" if cuda else "torch")).split(",")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    repeats = args.repeats or (20 if cuda else 5)
    elt = torch.empty(0, dtype=dtype).element_size()
    bandwidth = copy_bandwidth(device, dtype, tokens * args.n * 2560, repeats)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"device={name} torch={torch.__version__} dtype={dtype} tokens={tokens} n={args.n} t_max={args.t_max}")
    print(f"measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s")
    print(f"{'C':>5} {'op':<15}{'impl':<9}{'fwd ms':>9}{'fwd+bwd ms':>12}{'B/token':>9}{'fwd GB/s':>10}{'% copy':>8}")
    for c in (int(d) for d in args.dims.split(",")):
        inputs = make_inputs(tokens, args.n, c, device, dtype)
        for op_name, (fn, bytes_per_token) in op_table(args.n, c, args.t_max, elt).items():
            if op_name not in args.ops.split(","):
                continue
            for impl in impls:
                backend = "triton" if impl == "triton" else "torch"
                run = (lambda f=fn, b=backend: f(inputs, b))
                run_bwd = _with_backward(fn, inputs, backend)
                if impl == "compile":
                    compiled = torch.compile(fn)
                    run = (lambda f=compiled, b=backend: f(inputs, b))
                    run_bwd = _with_backward(compiled, inputs, backend)
                try:
                    fwd = timeit(run, device, repeats)
                    both = timeit(run_bwd, device, repeats)
                except Exception as exc:  # e.g. triton requested without CUDA
                    print(f"{c:>5} {op_name:<15}{impl:<9} unavailable: {str(exc).splitlines()[0][:60]}")
                    continue
                achieved = bytes_per_token * tokens / fwd
                print(f"{c:>5} {op_name:<15}{impl:<9}{fwd * 1e3:>9.3f}{both * 1e3:>12.3f}{bytes_per_token:>9d}"
                      f"{achieved / 1e9:>10.1f}{achieved / bandwidth * 100:>7.0f}%")


def _count_bytes(args) -> int:
    """``--bytes``: byte_count's table, with the kernels under Triton's interpreter (in this process
    when they are not imported yet, else in a child process)."""
    argv = ["--n", str(args.n), "--C", str(args.count_dim), "--tokens", str(args.tokens or 64),
            "--dtype", "fp32" if args.dtype == "fp32" else "bf16", "--t-max", str(args.t_max)]
    if args.json:
        argv += ["--json", args.json]
    from mhc_train.bench import byte_count

    if "mhc_kernels" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return byte_count.run_counted(argv)
    os.environ["TRITON_INTERPRET"] = "1"  # before mhc_kernels defines its kernels
    byte_count.main(argv)
    return 0


if __name__ == "__main__":
    main()
