"""The eager-torch floor of an mHC connection on this machine, against the step-time budget.

    python -m mhc_train.bench.eager_floor [--model small] [--batch 8] [--seq 256] [--threads N]

Issue "model core", item 8, asks the torch path for mHC (n = 4, t_max = 20) within 1.25x of the
baseline step: the connections may add 0.25 x (baseline step) / (sublayers) per sublayer. This
command measures, in one process and in interleaved rounds, the baseline and mHC steps and
everything one connection computes over its [T, n, C] streams, grouped so that each group holds
ops that eager torch could merge into fewer library calls:

- forward: the projection x phi, the RMS of x, the stream mixes (H_pre x; H_res x + H_post^T y),
  Sinkhorn-Knopp;
- backward: the projection's two gradients, the contractions over C (H_res, H_post, H_pre
  gradients), the sums over streams (x's gradient from the mix, from H_pre and from the RMS term;
  y's gradient), Sinkhorn's recomputation and vector-Jacobian product (the spec: the backward
  recomputes the iterations from the saved input).

Each group is timed in every form we know (operand orders, layouts, merged calls, streams stored
stream-major [n, T, C], log-domain Sinkhorn) and its fastest form counts; operands a merge needs side by side are built outside the
timing. Before each call a buffer larger than the last-level cache is written (``--evict-mb``):
in a step the operands were last touched a sublayer ago and come from memory. The sum of the
fastest forms is a lower bound for the connection in eager torch: left out are the elementwise
work on [T, n^2+2n] tensors, temporaries and Python overhead. ``check_forms_agree`` (tested)
makes sure every form computes what the first does.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import torch

from mhc_train.bench.model_step import VARIANTS, step_fn
from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.residual import ResidualConfig
from mhc_train.residual.sinkhorn import sinkhorn_forward, sinkhorn_recompute
from mhc_train.residual.torch_ops import _row_dot, _rows_bmm, _stream_sum as stream_sum

Form = tuple[str, Callable[[], torch.Tensor]]
TARGET = 1.25


def _log_sinkhorn(logits_nnt: torch.Tensor, t_max: int, keep: list | None = None) -> torch.Tensor:
    """Sinkhorn in the log domain ([n, n, T] layout): one log_softmax per normalisation."""
    for _ in range(t_max):
        for dim in (0, 1):
            logits_nnt = torch.log_softmax(logits_nnt, dim=dim)
            if keep is not None:
                keep.append((logits_nnt, dim))
    return logits_nnt


def _log_sinkhorn_backward(logits_nnt: torch.Tensor, grad_nnt: torch.Tensor, t_max: int) -> torch.Tensor:
    steps: list = []
    m = torch.exp(_log_sinkhorn(logits_nnt, t_max, keep=steps))
    g = grad_nnt * m
    for out, dim in reversed(steps):
        g = torch.ops.aten._log_softmax_backward_data(g, out, dim, g.dtype)
    return g


def connection_forms(tokens: int, n: int, c: int, t_max: int) -> dict[str, list[Form]]:
    """Everything one connection computes over the streams, in groups -> equivalent forms (name,
    callable returning the group's outputs), the first being the form the torch path uses
    (residual/torch_ops.py: streams stored stream-major). A group lists
    every merge of its ops into fewer library calls that eager torch allows; operands such a merge
    needs side by side (x next to y, g next to g_u) are prepared outside the timing, which only
    makes the bound lower. Random operands of the step's shapes, fp32."""
    gen = torch.Generator().manual_seed(0)
    w = n * n + 2 * n

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    x3, g3 = rnd(tokens, n, c), rnd(tokens, n, c)  # streams; gradient of the write's output
    y, g_u = rnd(tokens, c), rnd(tokens, c)  # sublayer output; gradient of u = H_pre x
    x, phi, g_proj = x3.view(tokens, n * c), rnd(n * c, w) * 0.02, rnd(tokens, w)
    phi_t = phi.t().contiguous()
    h_res = torch.softmax(rnd(tokens, n, n), dim=-1)
    h_pre, h_post, coef = torch.rand(tokens, n, generator=gen), 2 * torch.rand(tokens, n, generator=gen), rnd(tokens, 1)
    h_res_t = h_res.transpose(1, 2).contiguous()
    logits, g_h = rnd(tokens, n, n), rnd(tokens, n, n)
    logits_nnt, g_h_nnt = (t.permute(1, 2, 0).contiguous() for t in (logits, g_h))
    # Merged operands: rows/columns side by side so that one bmm does several products.
    pre_res = torch.cat([h_pre[:, None], h_res], dim=1)  # [T, n+1, n]
    res_post = torch.cat([h_res, h_post[:, :, None]], dim=2)  # [T, n, n+1]
    x_y = torch.cat([x3, y[:, None]], dim=1)  # [T, n+1, C]
    gu_g = torch.cat([g_u[:, None], g3], dim=1)  # [T, n+1, C]
    rest_post = torch.cat([h_res_t, h_post[:, None]], dim=1)  # [T, n+1, n]: H_res^T rows, then H_post
    eye_coef = coef[:, :, None] * torch.eye(n)  # [T, n, n]
    mix_all = torch.cat([h_res_t, h_pre[:, :, None], eye_coef], dim=2)  # [T, n, 2n+1]
    g_gu_x = torch.cat([g3, g_u[:, None], x3], dim=1)  # [T, 2n+1, C]
    # Stream-major storage [n, T, C]: row i of a per-token mix is then one contiguous [T, C] plane,
    # which one M = 1 bmm writes directly (x_tv, g_tv: the same memory seen as [T, n, C]).
    x_sm, g_sm = (t.permute(1, 0, 2).contiguous() for t in (x3, g3))
    x_tv, g_tv = x_sm.permute(1, 0, 2), g_sm.permute(1, 0, 2)

    def mixes_separate():
        out = torch.bmm(h_res, x3)
        return stream_sum(h_pre, x3), out.addcmul_(h_post[:, :, None], y[:, None])

    def mixes_pre_res():
        both = torch.bmm(pre_res, x3)
        return both[:, 0], both[:, 1:].addcmul_(h_post[:, :, None], y[:, None])

    def sums_separate():
        gx = torch.bmm(h_res_t, g3).addcmul_(h_pre[:, :, None], g_u[:, None]).addcmul_(coef[:, :, None], x3)
        return gx, stream_sum(h_post, g3)

    def sums_res_post():
        both = torch.bmm(rest_post, g3)
        return both[:, :n].addcmul_(h_pre[:, :, None], g_u[:, None]).addcmul_(coef[:, :, None], x3), both[:, n]

    def rows_into(out_sm, mats, v_tv):  # the torch path's stream-major mix
        _rows_bmm(mats, v_tv, out_sm)
        return out_sm

    def mixes_stream_major():
        out = rows_into(x_sm.new_empty(n, tokens, c), h_res, x_tv)
        out.addcmul_(h_post.t()[:, :, None], y[None])
        return stream_sum(h_pre, x_tv), out.permute(1, 0, 2)

    def sums_stream_major():
        gx = rows_into(g_sm.new_empty(n, tokens, c), h_res.transpose(1, 2), g_tv)
        gx.addcmul_(h_pre.t()[:, :, None], g_u[None]).addcmul_(coef[None], x_sm)
        return gx.permute(1, 0, 2), stream_sum(h_post, g_tv)

    def contractions_stream_major():
        return torch.bmm(g_tv, x_tv.transpose(1, 2)), _row_dot(g_tv, y), _row_dot(x_tv, g_u)

    phi3 = phi.view(n, c, w)

    def projection_per_stream():
        proj = x_sm[0] @ phi3[0]
        for i in range(1, n):
            proj.addmm_(x_sm[i], phi3[i])
        return proj

    def contractions_separate():
        return torch.bmm(g3, x3.transpose(1, 2)), _row_dot(g3, y), _row_dot(x3, g_u)

    def contractions_x_y():
        both = torch.bmm(g3, x_y.transpose(1, 2))
        return both[:, :, :n], both[:, :, n], _row_dot(x3, g_u)

    def contractions_gu_g():
        both = torch.bmm(gu_g, x3.transpose(1, 2))
        return both[:, 1:], _row_dot(g3, y), both[:, 0]

    return {
        "projection x.phi": [
            ("stream-major: n addmm", projection_per_stream),
            ("x @ phi", lambda: x @ phi),
            ("(phi^T x^T)^T", lambda: (phi_t @ x.t()).t()),
            ("linear(x, phi^T)", lambda: torch.nn.functional.linear(x, phi_t)),
        ],
        "RMS of x": [
            ("stream-major: per-stream norms", lambda: torch.linalg.vector_norm(x_sm, dim=-1).square().sum(0).sqrt()),
            ("vector_norm", lambda: torch.linalg.vector_norm(x, dim=-1)),
            ("sqrt(sum x^2)", lambda: x.pow(2).sum(dim=-1).sqrt()),
        ],
        "mixes H_pre x, H_res x + H_post^T y": [
            ("stream-major: bmm, n row bmm", mixes_stream_major),
            ("bmm, bmm, addcmul", mixes_separate),
            ("bmm [pre;res], addcmul", mixes_pre_res),
            ("bmm, bmm [res|post] [x;y]", lambda: (stream_sum(h_pre, x3), torch.bmm(res_post, x_y))),
        ],
        "sinkhorn forward": [
            ("token-last sum/div", lambda: sinkhorn_forward(logits, t_max)),
            ("log_softmax", lambda: torch.exp(_log_sinkhorn(logits_nnt, t_max)).permute(2, 0, 1)),
        ],
        "projection grad x": [  # [T, n, C] views of the [T, nC] result
            ("stream-major: bmm over streams",
             lambda: torch.bmm(g_proj.expand(n, tokens, w), phi3.transpose(1, 2)).transpose(0, 1)),
            ("g @ phi^T", lambda: (g_proj @ phi.t()).view(tokens, n, c)),
            ("g @ contiguous phi^T", lambda: (g_proj @ phi_t).view(tokens, n, c)),
            ("(phi g^T)^T", lambda: (phi @ g_proj.t()).t().view(tokens, n, c)),
        ],
        "projection grad phi": [
            ("stream-major: bmm over streams",
             lambda: torch.bmm(x_sm.transpose(1, 2), g_proj.expand(n, tokens, w)).view(n * c, w)),
            ("(g^T x)^T", lambda: (g_proj.t() @ x).t()),
            ("x^T @ g", lambda: x.t() @ g_proj),
        ],
        "grads over C: H_res, H_post, H_pre": [
            ("stream-major: bmm, row dots", contractions_stream_major),
            ("bmm, row dot, row dot", contractions_separate),
            ("bmm g [x;y]^T, row dot", contractions_x_y),
            ("bmm [g_u;g] x^T, row dot", contractions_gu_g),
        ],
        "grads over n: x (mix, pre, RMS), y": [
            ("stream-major: n row bmm, bmm", sums_stream_major),
            ("bmm, 2 addcmul, bmm", sums_separate),
            ("bmm [res^T;post], 2 addcmul", sums_res_post),
            ("bmm [res^T|pre|coef I], bmm", lambda: (torch.bmm(mix_all, g_gu_x), stream_sum(h_post, g3))),
        ],
        "sinkhorn recompute+vjp": [
            ("token-last sum/div", lambda: sinkhorn_recompute(logits, t_max)[1](g_h)),
            ("log_softmax", lambda: _log_sinkhorn_backward(logits_nnt, g_h_nnt, t_max).permute(2, 0, 1)),
        ],
    }


def check_forms_agree(forms: dict[str, list[Form]], rtol: float = 1e-4) -> None:
    """Every form of an op must compute the first form's values, or the bound means nothing."""
    for op, variants in forms.items():
        refs = _as_tuple(variants[0][1]())
        for name, fn in variants[1:]:
            for ref, got in zip(refs, _as_tuple(fn()), strict=True):
                err = (got - ref).abs().max().item()
                if err > rtol * (ref.abs().max().item() or 1.0):
                    raise AssertionError(f"{op}: form {name!r} differs from {variants[0][0]!r} by {err:.3g}")


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def measure(args) -> dict:
    """Interleaved rounds: baseline step, mHC step, then every form. Medians in seconds."""
    cfg = load_model_config(args.model)
    torch.manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    steps = {}
    for name in ("baseline", "mhc"):
        rcfg = ResidualConfig(**{**VARIANTS[name], **({"t_max": args.t_max, "n": args.n} if name == "mhc" else {})})
        steps[name] = step_fn(MHCTransformer(cfg, rcfg).train(), batch)
    forms = connection_forms(args.batch * args.seq, args.n, cfg.dim, args.t_max)
    check_forms_agree(forms)
    timed: dict[str, Callable] = dict(steps)
    timed.update({f"{op}|{name}": fn for op, variants in forms.items() for name, fn in variants})
    for fn in timed.values():  # warm-up
        fn()
    # In a step an op's operands were last touched a sublayer ago, with attention and the MoE in
    # between: they come from memory, not from the cache. Each op call here starts the same way.
    evict = torch.empty(args.evict_mb * 2**20 // 4)
    times: dict[str, list[float]] = {k: [] for k in timed}
    for r in range(args.rounds):
        for key, fn in timed.items():
            reps = 1 if key in steps else args.op_repeats
            total = 0.0
            for _ in range(reps):
                if key not in steps and args.evict_mb:
                    evict.fill_(float(r))
                start = time.perf_counter()
                fn()
                total += time.perf_counter() - start
            times[key].append(total / reps)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return dict(cfg=cfg, forms=forms, medians=medians)


def report(args, cfg, forms, medians) -> list[str]:
    layers = cfg.n_sublayers
    base, mhc = medians["baseline"], medians["mhc"]
    budget = (TARGET - 1.0) * base / layers
    spent = (mhc - base) / layers
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [
        f"model={args.model} tokens={args.batch * args.seq} n={args.n} C={cfg.dim} t_max={args.t_max} "
        f"sublayers={layers} rounds={args.rounds} device={device} torch={torch.__version__}",
        f"baseline step {base * 1e3:.1f} ms, mHC step {mhc * 1e3:.1f} ms ({mhc / base:.3f}x): "
        f"the connections cost {spent * 1e3:.2f} ms per sublayer",
        f"{TARGET}x budget: {TARGET - 1.0:.2f} x {base * 1e3:.1f} ms / {layers} = {budget * 1e3:.2f} ms per sublayer",
        f"{'group':<38}{'fastest form':<30}{'ms':>7}   other forms (ms)",
    ]
    floor = 0.0
    for op, variants in forms.items():
        ranked = sorted(variants, key=lambda v: medians[f"{op}|{v[0]}"])
        best = medians[f"{op}|{ranked[0][0]}"]
        floor += best
        others = ", ".join(f"{name} {medians[f'{op}|{name}'] * 1e3:.2f}" for name, _ in ranked[1:])
        lines.append(f"{op:<38}{ranked[0][0]:<30}{best * 1e3:>7.2f}   {others}")
    lines.append(f"{'floor (sum of the fastest forms)':<68}{floor * 1e3:>7.2f}   = at best "
                 f"{1.0 + floor * layers / base:.3f}x the baseline step (measured {mhc / base:.3f}x, target {TARGET}x)")
    verdict = "above" if floor > budget else "within"
    lines.append(f"the eager floor is {verdict} the budget: {floor * 1e3:.2f} vs {budget * 1e3:.2f} ms per sublayer")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--t-max", type=int, default=20)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--op-repeats", type=int, default=5, help="calls per op per round")
    p.add_argument("--evict-mb", type=int, default=128,
                   help="MB written before each op call to push its operands out of the cache (0: warm)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    measured = measure(args)
    print("\n".join(report(args, **measured)))


if __name__ == "__main__":
    main()
