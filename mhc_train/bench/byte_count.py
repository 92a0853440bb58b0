"""Counted bytes per token of the mHC ops, per backend, against the minimum (``mhc-train-bench-ops --bytes``).

Nothing here is assumed: each op's forward and backward implementation is run on a small token
count and what it moves is counted.

* Triton backend (``mhc_kernels``): the kernels run under Triton's interpreter
  (``TRITON_INTERPRET=1``, so this works without a GPU) with its load and store primitives
  wrapped: every ``tl.load`` / ``tl.store``, masked or not, adds element size x active mask lanes.
  Each access is attributed to the tensor whose memory it touches (x, phi, grad, ...; "new[shape]"
  for buffers the implementation makes itself, e.g. g_proj or grad_phi partials), so re-reads
  show: phi and bias are loaded once per program (per token block / K slice) and so appear per
  token amortised over the program's tokens, at the token count of the run; on a GPU those
  re-reads come from L2. The torch glue around the launches (``torch.zeros`` of a buffer, the sum
  of grad_phi partials, dtype casts) is counted as the torch backend's is, and reported with it.
* torch backend (``mhc_train.residual.torch_ops``): a ``TorchDispatchMode`` sums the bytes of
  every aten op's tensor inputs and outputs: an eager op reads its inputs from memory and writes
  its outputs. Views and metadata ops (empty, reshape, transpose, ...) move nothing; ``out=``
  arguments and the destination of ``copy_`` / ``fill_`` / ``zero_`` count as writes only. This
  is the eager (unfused) traffic; a matmul's operand re-reads inside one op are not counted.

The minimum (per token, in elements; "C" = C elements of the stream dtype, the small terms in
fp32). Every input an output depends on must be read once and every output written once:

* write, ``apply_post_res`` forward: out = H_res x + H_post^T y. Reads x (nC) and y (C), writes
  out (nC): (n+1)C reads, nC writes (the paper's fused kernel), + n + n^2 coefficients read.
* write backward: grad_x = H_res^T g needs g (nC); grad_y = H_post . g; grad_H_post = g . y needs
  y (C); grad_H_res = g x^T needs x (nC) (x cannot be recovered from the output: H_res may be
  singular). Reads (2n+1)C + n + n^2, writes grad_x, grad_y: (n+1)C + n + n^2.
* read, ``mhc_pre_mappings`` forward (mappings + H_pre x): reads x (nC), writes u (C) + 2n + n^2
  coefficients (+ W + 1 saved for the backward: proj = x phi and 1/r), W = n^2 + 2n; phi (nC x W)
  is a parameter read once per program, not per token.
* read backward: grad_x = g_proj phi^T + coef x + H_pre (x) g_u needs x (nC) and g_u (C); writes
  grad_x (nC); + the small terms (g_pre, g_post, g_res, proj, 1/r, h_pre: ~2W + n + 1 read). Strict
  minimum (n+1)C reads, nC writes. But grad_H_pre = x . g_u (a reduction over all of x) feeds
  g_proj and coef, which every element of grad_x and grad_phi needs, so unless a token's whole nC
  stays on chip x is read twice: (2n+1)C reads (2n+2 if g_u is read in both passes) in practice.
* ``apply_pre`` (u = H_pre x, the unfused read's second half): forward nC reads, C writes;
  backward reads x (nC) and g_u (C), writes grad_x (nC) + n.
* ``sinkhorn_knopp``: n^2 logits in, n^2 out forward; backward 2n^2 in (logits, grad), n^2 out
  (iterations recomputed on chip), fp32.

Summed over one sublayer's connection (read + write, n = 4): forward 9C read, 5C written; backward
(write 9C / 5C, read 5C / 4C strict or 9-10C / 4C with the second pass over x): 14C read, 9C
written strict. The streams' two gradients (from the read and from the write) are added by
autograd unless one backward accumulates into the other (a further 2nC read + nC written).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that allocate or only change metadata: they move no bytes
_NO_TRAFFIC = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
    "set_", "resize_", "sym_size", "sym_stride", "sym_numel", "is_same_size", "_local_scalar_dense",
}
_ALLOC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
_WRITE_ONLY_SELF = {"copy_", "fill_", "zero_", "normal_", "uniform_"}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Traffic:
    """Bytes read and written, by tensor name (``named`` ranges) and in total."""

    def __init__(self, named: dict[str, torch.Tensor] | None = None):
        self.reads: dict[str, int] = {}
        self.writes: dict[str, int] = {}
        self.ranges = []
        for name, t in (named or {}).items():
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                start = t.data_ptr()
                self.ranges.append((name, start, start + _nbytes(t)))

    def register(self, name: str, t: torch.Tensor) -> None:
        """Name the memory of ``t`` (later accesses to it are attributed to ``name``)."""
        if t.numel() > 0:
            start = t.data_ptr()
            self.ranges.insert(0, (name, start, start + _nbytes(t)))

    def name_of(self, t: torch.Tensor) -> str:
        p = t.data_ptr() if t.numel() > 0 else 0
        for name, lo, hi in self.ranges:
            if lo <= p < hi:
                return name
        return "temp"

    def add(self, kind: str, name: str, nbytes: int) -> None:
        d = self.reads if kind == "read" else self.writes
        d[name] = d.get(name, 0) + int(nbytes)

    @property
    def read(self) -> int:
        return sum(self.reads.values())

    @property
    def written(self) -> int:
        return sum(self.writes.values())

    def add_lanes(self, kind: str, ptrs, mask, elt: int) -> None:
        """Interpreter access: ``ptrs`` (uint64 addresses) where ``mask`` is set."""
        import numpy as np

        addr = np.asarray(ptrs).reshape(-1)
        active = np.broadcast_to(np.asarray(mask, dtype=bool), np.asarray(ptrs).shape).reshape(-1)
        addr = addr[active]
        left = np.ones(addr.shape, dtype=bool)
        for name, lo, hi in self.ranges:
            inside = left & (addr >= lo) & (addr < hi)
            k = int(inside.sum())
            if k:
                self.add(kind, name, k * elt)
                left &= ~inside
        k = int(left.sum())
        if k:
            self.add(kind, "temp", k * elt)


class _AtenCounter(TorchDispatchMode):
    """Sums every aten op's tensor inputs (reads) and outputs (writes)."""

    def __init__(self, traffic: Traffic):
        super().__init__()
        self.traffic = traffic
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        name = func._schema.name.split("::")[-1]
        if name in _ALLOC:
            for t in _tensors(out):  # a buffer the implementation makes: named by its shape
                self.traffic.register("new" + str(list(t.shape)).replace(" ", ""), t)
        if name in _NO_TRAFFIC or any(r.alias_info is not None and not r.alias_info.is_write
                                      for r in func._schema.returns):
            return out  # views and metadata
        read_args = list(args)
        if name in _WRITE_ONLY_SELF and read_args:
            read_args = read_args[1:]  # the destination is written, not read
        reads = list(_tensors(read_args)) + [t for k, v in kwargs.items() if k != "out" for t in _tensors(v)]
        for t in reads:
            self.traffic.add("read", self.traffic.name_of(t), _nbytes(t))
        for t in _tensors(out):
            if self.traffic.name_of(t) == "temp":
                self.traffic.register("new" + str(list(t.shape)).replace(" ", ""), t)
            self.traffic.add("write", self.traffic.name_of(t), _nbytes(t))
        return out


@contextlib.contextmanager
def count_torch(named: dict[str, torch.Tensor] | None = None):
    """Counts the aten traffic inside the block: ``with count_torch() as traffic: ...``."""
    traffic = Traffic(named)
    with _AtenCounter(traffic):
        yield traffic


@contextlib.contextmanager
def count_triton(named: dict[str, torch.Tensor] | None = None):
    """Counts the interpreted kernels' loads and stores inside the block (by tensor name, else
    "new[shape]" for buffers made inside) and the torch glue between them. Needs TRITON_INTERPRET=1 set before the
    kernels were defined."""
    from triton.runtime import interpreter

    traffic = Traffic(named)
    builder = interpreter.InterpreterBuilder
    orig_load, orig_store = builder.create_masked_load, builder.create_masked_store
    orig_call = interpreter.GridExecutor.__call__
    aten = _AtenCounter(traffic)

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        elt = ptrs.get_element_ty().primitive_bitwidth // 8
        traffic.add_lanes("read", ptrs.data, mask.data, elt)
        return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        elt = ptrs.get_element_ty().primitive_bitwidth // 8
        traffic.add_lanes("write", ptrs.data, mask.data, elt)
        return orig_store(self, ptrs, value, mask, cache_policy)

    def call(self, *args, **kwargs):
        aten.paused += 1  # the interpreter's own host copies of the arguments are not traffic
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            aten.paused -= 1

    builder.create_masked_load, builder.create_masked_store = load, store
    interpreter.GridExecutor.__call__ = call
    try:
        with aten:
            yield traffic
    finally:
        builder.create_masked_load, builder.create_masked_store = orig_load, orig_store
        interpreter.GridExecutor.__call__ = orig_call


# --------------------------------------------------------------------------------------------
# The ops, their minima and the table
# --------------------------------------------------------------------------------------------

OPS = ("apply_post_res", "pre_mappings", "apply_pre", "sinkhorn")


def minimum(op: str, direction: str, n: int, c: int, elt: int) -> tuple[int, int]:
    """(bytes read, bytes written) per token at least (see the module docstring). Streams in
    ``elt`` bytes, coefficients fp32; parameters (phi, alpha, bias) and their gradients are per
    program / per call, not per token, and left out."""
    f = 4
    w = n * n + 2 * n
    if op == "apply_post_res":
        if direction == "fwd":
            return (n + 1) * c * elt + (n + n * n) * f, n * c * elt
        return (2 * n + 1) * c * elt + (n + n * n) * f, (n + 1) * c * elt + (n + n * n) * f
    if op == "pre_mappings":
        if direction == "fwd":
            return n * c * elt, c * elt + (2 * n + n * n + w + 1) * f
        # g_pre, g_post, g_res (W), proj (W), 1/r, h_pre (n)
        return (n + 1) * c * elt + (2 * w + 1 + n) * f, n * c * elt
    if op == "apply_pre":
        if direction == "fwd":
            return n * c * elt + n * f, c * elt
        return (n + 1) * c * elt + n * f, n * c * elt + n * f
    if op == "sinkhorn":
        return (n * n * f, n * n * f) if direction == "fwd" else (2 * n * n * f, n * n * f)
    raise KeyError(op)


def _inputs(tokens: int, n: int, c: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = n * n + 2 * n

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    return dict(
        x=rnd(tokens, n, c), y=rnd(tokens, c), g_u=rnd(tokens, c), g_out=rnd(tokens, n, c),
        phi=rnd(n * c, w, scale=0.1, dt=torch.float32), alpha=torch.tensor([0.7, 1.3, 0.9]),
        bias=rnd(w, scale=0.5, dt=torch.float32),
        h_pre=torch.rand(tokens, n, generator=g), h_post=2 * torch.rand(tokens, n, generator=g),
        h_res=torch.softmax(torch.randn(tokens, n, n, generator=g), -1),
        g_pre=rnd(tokens, n, dt=torch.float32), g_post=rnd(tokens, n, dt=torch.float32),
        g_res=rnd(tokens, n, n, dt=torch.float32), logits=rnd(tokens, n, n, dt=torch.float32),
    )


def _runs(impl, op: str, i: dict, t_max: int):
    """(forward thunk, backward thunk, named tensors) of ``op`` in module ``impl``."""
    if op == "apply_post_res":
        args = (i["x"], i["y"], i["h_post"], i["h_res"])
        return (lambda: impl.apply_post_res_forward(*args),
                lambda: impl.apply_post_res_backward(*args, i["g_out"], (True, True, True, True)),
                dict(x=i["x"], y=i["y"], h_post=i["h_post"], h_res=i["h_res"], grad=i["g_out"]))
    if op == "apply_pre":
        return (lambda: impl.apply_pre_forward(i["x"], i["h_pre"]),
                lambda: impl.apply_pre_backward(i["x"], i["h_pre"], i["g_u"], (True, True)),
                dict(x=i["x"], h_pre=i["h_pre"], grad=i["g_u"]))
    if op == "sinkhorn":
        return (lambda: impl.sinkhorn_knopp_forward(i["logits"], t_max),
                lambda: impl.sinkhorn_knopp_backward(i["logits"], i["g_res"], t_max),
                dict(logits=i["logits"], grad=i["g_res"]))
    if op == "pre_mappings":
        saved = impl.mhc_pre_mappings_forward(i["x"], i["phi"], i["alpha"], i["bias"], t_max, 1e-6)
        _, h_pre, h_post, _, proj, inv_r = saved
        named = dict(x=i["x"], phi=i["phi"], alpha=i["alpha"], bias=i["bias"], proj=proj, inv_r=inv_r,
                     h_pre=h_pre, h_post=h_post, g_u=i["g_u"], g_pre=i["g_pre"], g_post=i["g_post"],
                     g_res=i["g_res"])
        return (lambda: impl.mhc_pre_mappings_forward(i["x"], i["phi"], i["alpha"], i["bias"], t_max, 1e-6),
                lambda: impl.mhc_pre_mappings_backward(i["x"], i["phi"], i["alpha"], i["bias"], proj, inv_r, h_pre,
                                                       h_post, i["g_u"], i["g_pre"], i["g_post"], i["g_res"],
                                                       t_max, (True, True, True, True)),
                named)
    raise KeyError(op)


def is_param(name: str, n: int, c: int) -> bool:
    """phi, alpha, bias, and buffers of phi's size (grad_phi and its per-split partials): per call
    or per program, not per token."""
    if name in ("phi", "alpha", "bias"):
        return True
    if name.startswith("new["):
        shape = [int(v) for v in name[4:-1].split(",") if v]
        k, w = n * c, n * n + 2 * n
        return shape[-2:] in ([k, w], [w, k])
    return False


def _row(traffic: Traffic, tokens: int, n: int, c: int) -> dict:
    per = lambda d: {k: round(v / tokens, 2) for k, v in sorted(d.items())}  # noqa: E731
    split = lambda d, want: sum(v for k, v in d.items() if is_param(k, n, c) == want) / tokens  # noqa: E731
    return dict(read=round(split(traffic.reads, False), 2), written=round(split(traffic.writes, False), 2),
                param_read=round(split(traffic.reads, True), 2), param_written=round(split(traffic.writes, True), 2),
                reads_by_tensor=per(traffic.reads), writes_by_tensor=per(traffic.writes))


def count_ops(n: int = 4, c: int = 64, tokens: int = 64, dtype=torch.bfloat16, t_max: int = 20,
              backends=("triton", "torch"), ops=OPS) -> list[dict]:
    """Counted bytes per token of each op, direction and backend, with the minimum."""
    from mhc_train.residual import torch_ops

    elt = torch.empty(0, dtype=dtype).element_size()
    rows = []
    for op in ops:
        for backend in backends:
            if backend == "triton":
                import mhc_kernels
                from mhc_kernels._common import is_interpreted
                from mhc_kernels.apply import _apply_pre_fwd_kernel

                if not is_interpreted(_apply_pre_fwd_kernel):
                    raise RuntimeError("counting the Triton kernels needs TRITON_INTERPRET=1 before mhc_kernels "
                                       "is imported")
                impl, counter = mhc_kernels, count_triton
            else:
                impl, counter = torch_ops, count_torch
            i = _inputs(tokens, n, c, dtype)
            fwd, bwd, named = _runs(impl, op, i, t_max)
            for direction, thunk in (("fwd", fwd), ("bwd", bwd)):
                with counter(named) as traffic:
                    thunk()
                lo_r, lo_w = minimum(op, direction, n, c, elt)
                row = dict(op=op, direction=direction, backend=backend, n=n, C=c, tokens=tokens,
                           dtype=str(dtype).replace("torch.", ""), min_read=lo_r, min_written=lo_w,
                           **_row(traffic, tokens, n, c))
                row["x_min"] = round((row["read"] + row["written"]) / (lo_r + lo_w), 2)
                rows.append(row)
    if "pre_mappings" in ops and "apply_post_res" in ops:
        # one sublayer's connection: its read (mappings + H_pre x) and its write (post-res)
        for backend in backends:
            for direction in ("fwd", "bwd"):
                parts = [r for r in rows if r["backend"] == backend and r["direction"] == direction
                         and r["op"] in ("pre_mappings", "apply_post_res")]
                row = dict(parts[0], op="connection", reads_by_tensor={}, writes_by_tensor={})
                for key in ("min_read", "min_written", "read", "written", "param_read", "param_written"):
                    row[key] = round(sum(r[key] for r in parts), 2)
                row["x_min"] = round((row["read"] + row["written"]) / (row["min_read"] + row["min_written"]), 2)
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table: bytes per token, and in units of C stream elements (C x element size).
    read / written: streams and per-token coefficients; params: phi, alpha, bias and grad_phi
    (partials), per token at the run's token count (amortised over more tokens on a GPU run)."""
    out = ["| op | dir | backend | read B/tok | written B/tok | read (C units) | written (C units) "
           "| min read | min written | x min | params read / written B/tok |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        unit = r["C"] * (2 if r["dtype"] in ("bfloat16", "float16") else 4)
        out.append(f"| {r['op']} | {r['direction']} | {r['backend']} | {r['read']:.0f} | {r['written']:.0f} "
                   f"| {r['read'] / unit:.1f}C | {r['written'] / unit:.1f}C | {r['min_read']} | {r['min_written']} "
                   f"| {r['x_min']:.2f} | {r['param_read']:.0f} / {r['param_written']:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Counted bytes per token of the mHC ops against the minimum")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--C", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--t-max", type=int, default=20)
    p.add_argument("--backends", default="triton,torch")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows = count_ops(args.n, args.C, args.tokens, dtype, args.t_max, tuple(args.backends.split(",")),
                     tuple(args.ops.split(",")))
    print(f"counted bytes per token: n={args.n} C={args.C} tokens={args.tokens} dtype={args.dtype} "
          f"(triton: interpreted loads/stores + torch glue; torch: eager aten inputs + outputs)")
    print(table(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        command = (f"TRITON_INTERPRET=1 mhc-train-bench-ops --bytes --n {args.n} --count-dim {args.C} "
                   f"--tokens {args.tokens} --dtype {args.dtype} --t-max {args.t_max} --json {args.json}")
        meta = dict(command=command, n=args.n, C=args.C,
                    tokens=args.tokens, dtype=args.dtype, t_max=args.t_max)
        with open(args.json, "w") as fh:
            json.dump(dict(meta=meta, rows=rows), fh, indent=1)
            fh.write("\n")


def run_counted(argv: list[str]) -> int:
    """``main(argv)`` in a process with TRITON_INTERPRET=1 (the kernels must be defined under it)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.call([sys.executable, "-m", "mhc_train.bench.byte_count", *argv], env=env)


if __name__ == "__main__":
    main()
