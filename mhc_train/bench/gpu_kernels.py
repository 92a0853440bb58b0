"""GPU check, correctness: the backend's self-test, then every Triton kernel against its torch
reference at the check's shapes, forward and backward.

Each op runs through the public ops (``mhc_train.residual.ops``) once with ``backend="triton"``
and once with ``backend="torch"`` on the same inputs; its outputs and the gradients of its inputs
(for the same random output gradients) are compared tensor by tensor as
``||got - want|| / ||want||``. The tolerances are stated beside the figures:

- bf16 / fp16 tensors (streams and their gradients): ``2^-7``, one bf16 epsilon. Both sides
  compute in fp32 and round once to bf16, so they differ by at most one ulp in the entries that
  round differently: a norm-relative error of a few 1e-3 at most. A wrong kernel is off by 1e-2
  and more, a zeroed gradient by 1.
- fp32 tensors (the mappings and their gradients): 1e-4 with IEEE fp32 matmuls; 5e-3 when
  ``torch.get_float32_matmul_precision()`` allows TF32, which both the kernels and cuBLAS then use
  with different rounding (tests/test_kernels.py uses the same bounds). TF32 keeps 10 mantissa
  bits: norm-relative errors of ~1e-3 from rounding, where a wrong kernel is off by 1e-2 and more.

On a GPU the checks (and the timings of the other sections) run under the trainer's
``train.matmul_precision=high`` (``training_precision``): the kernels checked are those trained with.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch

from mhc_train.bench import ops as bench_ops
from mhc_train.bench.gpu_report import one_line
from mhc_train.residual import ResidualConfig, backend, ops

LOW_PRECISION_TOL = 2.0 ** -7
FP32_TOL = {"ieee": 1e-4, "tf32": 5e-3}


@functools.lru_cache(maxsize=None)
def stream_inputs(tokens: int, n: int, c: int, device: torch.device, dtype: torch.dtype) -> dict:
    """``bench.ops.make_inputs``, kept for the bandwidth section (generating the largest width's
    streams on the host takes seconds); ``stream_inputs.cache_clear()`` frees them."""
    return bench_ops.make_inputs(tokens, n, c, device, dtype)


def run_self_test(check) -> dict:
    reason = backend.self_test(check.device)
    line = "every kernel compiled and agreed with the reference on tiny inputs" if reason is None else reason
    return {"passed": reason is None, "reason": reason, "summary": [f"`backend.self_test({check.device})`: {line}"]}


TRAINING_MATMUL_PRECISION = "high"  # configs/config.yaml train.matmul_precision: TF32 on CUDA


@contextlib.contextmanager
def training_precision(device: torch.device) -> Iterator[None]:
    """fp32 matmuls as the trainer runs them (``trainer.apply_matmul_precision``): TF32 on CUDA,
    for cuBLAS and the kernels' ``tl.dot`` alike; on CPU nothing changes. Restored afterwards."""
    saved = torch.get_float32_matmul_precision()
    if device.type == "cuda":
        torch.set_float32_matmul_precision(TRAINING_MATMUL_PRECISION)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def fp32_tolerance() -> tuple[str, float]:
    precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return precision, FP32_TOL[precision]


def kernel_cases(t_max: int, eps: float) -> dict:
    """op -> (run(backend, inputs) -> outputs, input names, output names)."""
    return {
        "sinkhorn_knopp": (lambda b, i: ops.sinkhorn_knopp(i["logits"], t_max, backend=b), ("logits",), ("h_res",)),
        "mhc_mappings": (lambda b, i: ops.mhc_mappings(i["x"], i["phi"], i["alpha"], i["bias"], t_max, eps, backend=b),
                         ("x", "phi", "alpha", "bias"), ("h_pre", "h_post", "h_res")),
        "fused_pre_mappings": (
            lambda b, i: ops.mhc_pre_mappings(i["x"], i["phi"], i["alpha"], i["bias"], t_max, eps, backend=b),
            ("x", "phi", "alpha", "bias"), ("u", "h_pre", "h_post", "h_res")),
        "apply_pre": (lambda b, i: ops.apply_pre(i["x"], i["h_pre"], backend=b), ("x", "h_pre"), ("u",)),
        "apply_post_res": (lambda b, i: ops.apply_post_res(i["x"], i["y"], i["h_post"], i["h_res"], backend=b),
                           ("x", "y", "h_post", "h_res"), ("out",)),
    }


def relative_error(got: torch.Tensor | None, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` in fp32; against an all-zero reference, ``||got||``."""
    if got is None:  # no gradient where the reference has one
        got = torch.zeros_like(want)
    want32 = want.detach().float()
    diff = torch.linalg.vector_norm(got.detach().float() - want32).item()
    scale = torch.linalg.vector_norm(want32).item()
    return diff / scale if scale > 0 else diff


def outputs_and_grads(run, name_of_inputs, inputs: dict, which: str, seed: int) -> list[torch.Tensor | None]:
    """The op's outputs, then the gradients of its inputs for fixed random output gradients."""
    leaves = {k: inputs[k].detach().requires_grad_(True) for k in name_of_inputs}
    out = run(which, leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator(device=outs[0].device).manual_seed(seed)
    weights = [torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [leaves[k] for k in name_of_inputs], weights, allow_unused=True)
    return [o.detach() for o in outs] + list(grads)


def compare_kernels(tokens: int, n: int, c: int, t_max: int, dtype: torch.dtype, device: torch.device,
                    with_sinkhorn: bool = True) -> list[dict]:
    """Every kernel against the reference on ``tokens`` tokens of n streams of width c: one record
    per output and input gradient (op, C, tensor, dtype, shape, rel_error, tolerance, passed)."""
    _, fp32_tol = fp32_tolerance()
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = {**stream_inputs(tokens, n, c, device, dtype),
              "logits": torch.randn(tokens, n, n, generator=gen, device=device) * 2.0}
    records = []
    for op, (run, in_names, out_names) in kernel_cases(t_max, ResidualConfig().rms_eps).items():
        if op == "sinkhorn_knopp" and not with_sinkhorn:
            continue
        width = None if op == "sinkhorn_knopp" else c
        try:
            got = outputs_and_grads(run, in_names, inputs, "triton", seed=c)
            want = outputs_and_grads(run, in_names, inputs, "torch", seed=c)
        except Exception as exc:  # a kernel that does not compile or launch: a result, the rest still runs
            # (the section's cap, a SectionTimeout, is no Exception: it ends the section here)
            records.append({"op": op, "C": width, "tensor": "-", "rel_error": float("nan"), "tolerance": None,
                            "passed": False, "error": one_line(exc)})
            continue
        names = list(out_names) + [f"grad {k}" for k in in_names]
        for name, g, w in zip(names, got, want):
            tol = LOW_PRECISION_TOL if w.dtype in (torch.bfloat16, torch.float16) else fp32_tol
            err = relative_error(g, w)
            records.append({"op": op, "C": width, "tensor": name,
                            "dtype": str(w.dtype).removeprefix("torch."), "shape": list(w.shape),
                            "rel_error": err, "tolerance": tol, "passed": err <= tol})
        del got, want
    return records


def run_kernel_checks(check) -> dict:
    with training_precision(check.device):
        return _kernel_checks(check)


def _kernel_checks(check) -> dict:
    s = check.shapes
    tokens = s.batch * s.seq
    precision, fp32_tol = fp32_tolerance()
    tensors, rows = [], []
    for i, c in enumerate(s.widths):
        found = compare_kernels(tokens, s.n, c, s.t_max, s.stream_dtype, check.device, with_sinkhorn=i == 0)
        tensors += found
        for op in dict.fromkeys(t["op"] for t in found):
            r = _op_row([t for t in found if t["op"] == op])
            rows.append(r)
            verdict = r.get("error") or (f"worst {r['worst']} at {r['worst_ratio']:.2f} of its tolerance "
                                         f"({'ok' if r['passed'] else 'FAILED'})")
            check.say(f"kernels C={r['C'] or '-'} {op}: {verdict}")
    failed = [t for t in tensors if not t["passed"]]
    summary = [f"tokens = {s.batch} x {s.seq} = {tokens}, n = {s.n}, t_max = {s.t_max}, streams "
               f"{str(s.stream_dtype).removeprefix('torch.')}, mappings fp32; fp32 matmul precision {precision}",
               f"tolerance of ||got - want|| / ||want||: {LOW_PRECISION_TOL:.2e} for bf16/fp16 tensors, "
               f"{fp32_tol:.0e} for fp32 ones",
               f"{len(tensors) - len(failed)} of {len(tensors)} tensors within tolerance"
               + (": failed " + ", ".join(f"{t['op']} C={t['C']} {t['tensor']}" for t in failed) if failed else "")]
    return {"passed": not failed and bool(tensors), "precision": precision, "rows": rows, "tensors": tensors,
            "summary": summary}


def _op_row(found: list[dict]) -> dict:
    """One op at one width: the worst output and gradient errors, the tensor nearest its bound."""
    if "error" in found[0]:
        return {"op": found[0]["op"], "C": found[0]["C"], "passed": False, "error": found[0]["error"]}
    n_out = sum(1 for t in found if not t["tensor"].startswith("grad "))
    ratios = [t["rel_error"] / t["tolerance"] for t in found]
    worst = max(range(len(found)), key=lambda i: _nan_last(ratios[i]))
    return {"op": found[0]["op"], "C": found[0]["C"],
            "outputs_max_rel_error": max((t["rel_error"] for t in found[:n_out]), key=_nan_last),
            "grads_max_rel_error": max((t["rel_error"] for t in found[n_out:]), key=_nan_last),
            "worst": found[worst]["tensor"], "worst_ratio": ratios[worst],
            "passed": all(t["passed"] for t in found)}


def _nan_last(v: float) -> float:
    """Sort key under which a NaN error is the worst of all."""
    return float("inf") if v != v else v
