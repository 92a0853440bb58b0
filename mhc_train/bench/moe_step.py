"""One MoE layer's forward+backward step: routed experts on grouped GEMM against the per-expert loop.

    python -m mhc_train.bench.moe_step [--widths small,3b] [--tokens 4096,1024] [--rounds 9]
                                       [--dtype fp32] [--threads 2] [--json PATH]

Each width is a model config (configs/model/<name>.yaml: dim, moe_ffn_dim, routed experts, top-k,
shared experts); one MoE layer (router, dispatch, experts, combine, shared experts) runs forward
and backward on ``--tokens`` random tokens with ``RoutedExperts.impl`` set to ``grouped``
(``torch._grouped_mm``) or ``loop`` (one matmul per expert after reading the row counts on the
host). Both use the same module and weights; their outputs and gradients are checked equal before
timing. The two are timed in interleaved rounds whose order alternates (G L, L G, ...), after
warm-up; median and minimum per impl and the ratio loop / impl are reported, the last also as the
median of the per-round ratios (paired: robust to load that changes between rounds). Paste the
table into docs/benchmarks.md with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from mhc_train.bench.ops import DTYPES, _sync
from mhc_train.model import load_model_config
from mhc_train.model.moe import MoE, grouped_mm_supported

IMPLS = ("grouped", "loop")


def make_layer(width: str, tokens: int, device: torch.device, dtype: torch.dtype):
    """The MoE of ``width`` at its config's init scale, tokens x [T, C] and an output gradient."""
    cfg = load_model_config(width)
    torch.manual_seed(0)
    moe = MoE(cfg).train()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, cfg.init_std)
    moe = moe.to(device=device, dtype=dtype)
    x = torch.randn(tokens, cfg.dim, device=device, dtype=dtype, requires_grad=True)
    return cfg, moe, x, torch.randn_like(x)


def step_fn(moe: MoE, x: torch.Tensor, grad: torch.Tensor, impl: str) -> Callable[[], dict[str, torch.Tensor]]:
    def step() -> dict[str, torch.Tensor]:
        moe.experts.impl = impl
        moe.zero_grad(set_to_none=True)
        x.grad = None
        out = moe(x)
        out.backward(grad)
        return {"out": out, "x.grad": x.grad, **{n: p.grad for n, p in moe.named_parameters()}}

    return step


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| / |b| (norms) over the output and every gradient."""
    return max(((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-30)).item() for k in b)


def interleaved(steps: dict[str, Callable], rounds: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each step, rounds alternating the order so that neither always goes first."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            _sync(device)
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def measure(width: str, tokens: int, args, device: torch.device, tol: float) -> list[dict]:
    cfg, moe, x, grad = make_layer(width, tokens, device, DTYPES[args.dtype])
    steps = {impl: step_fn(moe, x, grad, impl) for impl in IMPLS}
    results = {impl: {k: v.detach().clone() for k, v in steps[impl]().items()} for impl in IMPLS}
    diff = max_rel_diff(results["grouped"], results["loop"])
    if not diff <= tol:
        raise AssertionError(f"{width}: grouped and loop differ by {diff:.2e} (relative), more than {tol:.0e}")
    times = interleaved(steps, args.rounds, args.warmup, device)
    picks = "grouped" if grouped_mm_supported(x.detach(), moe.experts.w1) else "loop"
    loop_med, loop_min = statistics.median(times["loop"]), min(times["loop"])
    return [{"width": width, "dim": cfg.dim, "moe_ffn_dim": cfg.moe_ffn_dim, "experts": cfg.n_routed_experts,
             "top_k": cfg.n_activated_experts, "shared": cfg.n_shared_experts, "tokens": tokens, "impl": impl,
             "ms_median": statistics.median(ts) * 1e3, "ms_min": min(ts) * 1e3, "ms_all": [t * 1e3 for t in ts],
             "loop_over_impl_median": loop_med / statistics.median(ts), "loop_over_impl_min": loop_min / min(ts),
             "loop_over_impl_paired": statistics.median(lt / t for lt, t in zip(times["loop"], ts)),
             "max_rel_diff": diff, "auto_picks": picks} for impl, ts in times.items()]


def table(rows: list[dict]) -> list[str]:
    """loop/impl: of the medians, of the minima, and the median of the per-round ratios (paired)."""
    lines = [f"{'width':<7}{'C':>6}{'F':>6}{'E/k':>7}{'tokens':>8}  {'impl':<8}{'ms median':>11}{'ms min':>10}"
             f"{'loop/impl':>11}{'(min)':>8}{'(paired)':>10}"]
    for r in rows:
        lines.append(f"{r['width']:<7}{r['dim']:>6}{r['moe_ffn_dim']:>6}{r['experts']:>4}/{r['top_k']:<2}"
                     f"{r['tokens']:>8}  {r['impl']:<8}{r['ms_median']:>11.1f}{r['ms_min']:>10.1f}"
                     f"{r['loop_over_impl_median']:>10.2f}x{r['loop_over_impl_min']:>7.2f}x"
                     f"{r['loop_over_impl_paired']:>9.2f}x")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="small,3b", help="model configs whose MoE width to time [small,3b]")
    p.add_argument("--tokens", default="4096,1024", help="tokens per step, one per width or one for all")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", help="write the results as JSON")
    args = p.parse_args(argv)
    widths = args.widths.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    if len(tokens) == 1:
        tokens *= len(widths)
    if len(tokens) != len(widths) or min(tokens) < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--tokens needs one positive count per width (or one for all), --rounds >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    tol = 1e-4 if args.dtype == "fp32" else 3e-2
    rows = [row for width, n in zip(widths, tokens) for row in measure(width, n, args, device, tol)]
    dev = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU ({platform.processor() or platform.machine()})")
    command = " ".join(["python -m mhc_train.bench.moe_step", *(sys.argv[1:] if argv is None else argv)])
    print(f"MoE layer forward+backward, {args.dtype}, rounds={args.rounds} after {args.warmup} warm-up, "
          f"device={dev}, threads={torch.get_num_threads()}, torch={torch.__version__}")
    print("\n".join(table(rows)))
    if args.json:
        report = {"device": dev, "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
                  "dtype": args.dtype, "rounds": args.rounds, "warmup": args.warmup, "results": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
