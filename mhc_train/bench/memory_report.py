"""Bytes kept for backward per token per sublayer, measured with saved-tensor hooks, for
baseline / HC / mHC with and without residual-stream recomputation, beside the paper's Table 3.

    python -m mhc_train.bench.memory_report [--model small] [--batch 2] [--seq 64] [--n 4]

A tensor kept for backward counts once (by storage) under the part of the step that saved it:
- residual stream: what the connection ops and the sublayer pre-norm keep (streams, H_pre x,
  RMSNorm(H_pre x), mapping intermediates) plus the sublayer outputs F(.) they merge, and
  F's saved view of its own input, which is RMSNorm(H_pre x): the quantity of Table 3;
- attention / experts: everything else F keeps;
- parameters are not activations and are left out; embedding, head and loss are listed apart.
Table 3 with recomputation predicts n C ceil(L / L_r) + C L elements per token for the
residual stream (x_l0 per block, F output per sublayer), lightweight coefficients excluded.

    python -m mhc_train.bench.memory_report --activation-checkpoint [--json PATH]

measures instead the CPU memory of one training step (forward + backward of one batch) for every
``train.activation_checkpoint`` option x ``residual.recompute`` off / auto: the bytes alive when
backward starts (what the forward kept) and the peak during the step, both above what was
allocated before it (weights; the gradients made in backward count). Checkpointed blocks hide
their saves from saved-tensor hooks, so this mode counts allocations instead, from the
profiler's allocation events (``step_memory``).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.residual import ResidualConfig
from mhc_train.residual import recompute as rc


@dataclass
class MemoryRow:
    variant: str
    recompute: str
    block_size: int | None
    residual_bytes: float  # per token per sublayer
    layer_bytes: float
    other_bytes: float  # per token, whole model (embedding, head, loss)
    table3_bytes: float | None  # per token per sublayer, Table 3 with recomputation


def measure(model: MHCTransformer, tokens: torch.Tensor) -> dict[str, int]:
    """Bytes kept for backward by one training forward, split by part; storages counted once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, str] = {}
    sizes: dict[int, int] = {}

    def account(t: torch.Tensor, region) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in params or key in seen:
            return
        if region is None:
            part = "other"
        elif region[0] in ("read", "write") or (region[0] == "layer" and key == region[2]):
            part = "residual"
        else:
            part = "layer"
        seen[key], sizes[key] = part, storage.nbytes()

    def pack(t):
        account(t, rc.current_region())
        return t

    rc._save_observers.append(account)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(tokens[:, :-1], tokens[:, 1:])
    finally:
        rc._save_observers.remove(account)
    out.loss.backward()  # the graph must still be usable
    totals = {"residual": 0, "layer": 0, "other": 0}
    for key, part in seen.items():
        totals[part] += sizes[key]
    return totals


def report(model_name: str, batch: int, seq: int, n: int, t_max: int) -> list[MemoryRow]:
    cfg = load_model_config(model_name)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    num_tokens = batch * seq
    sublayers = cfg.n_sublayers
    rows = []
    for variant in ("baseline", "hc", "mhc"):
        for setting in ("off", "auto"):
            rcfg = ResidualConfig(variant=variant, n=n if variant != "baseline" else 1, t_max=t_max, recompute=setting)
            torch.manual_seed(0)
            model = MHCTransformer(cfg, rcfg).train()
            totals = measure(model, tokens)
            block = model.recompute_block_size()
            streams = rcfg.streams
            table3 = None
            if block is not None:
                elements = streams * cfg.dim * math.ceil(sublayers / block) + cfg.dim * sublayers
                table3 = elements * 4 / sublayers  # fp32 activations here
            rows.append(MemoryRow(
                variant, setting, block,
                totals["residual"] / num_tokens / sublayers,
                totals["layer"] / num_tokens / sublayers,
                totals["other"] / num_tokens,
                table3,
            ))
    return rows


@dataclass
class StepMemoryRow:
    variant: str
    activation_checkpoint: str
    recompute: str
    kept_bytes: int  # alive when backward starts: what the forward kept for it
    peak_bytes: int  # the step's peak (forward + backward)
    tokens: int


def _events(prof):
    """Every event the profiler recorded (op tree, depth first)."""
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        yield e
        stack.extend(e.children)


def _allocation_events(prof) -> list[tuple[int, int, int]]:
    """(time ns, address, bytes: + allocated, - freed) of every allocation event, in time order."""
    from torch._C._profiler import _EventType

    return sorted((e.start_time_ns, e.typed[1].ptr, e.typed[1].alloc_size) for e in _events(prof)
                  if e.typed[0] == _EventType.Allocation)


BACKWARD_MARK = "mhc_backward"


def allocated_during(fn) -> tuple[int, int]:
    """Run ``fn()`` under the profiler: (bytes alive when a ``record_function(BACKWARD_MARK)``
    region first began, 0 without one; the peak), both counting only CPU blocks allocated during
    the call (a block allocated before and freed inside does not count)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    marks = [e.start_time_ns for e in _events(prof) if e.name == BACKWARD_MARK]
    start = min(marks) if marks else None
    live: dict[int, int] = {}
    alive = peak = kept = 0
    for t, ptr, size in _allocation_events(prof):
        if start is not None and t >= start:
            kept, start = alive, None
        if size > 0:
            live[ptr] = size
            alive += size
        elif ptr in live:
            alive -= live.pop(ptr)
        peak = max(peak, alive)
    return kept, peak


def step_memory(model: MHCTransformer, tokens: torch.Tensor) -> tuple[int, int]:
    """(bytes alive when backward starts: what the forward kept; the peak) of one forward +
    backward of ``tokens`` [B, S + 1], above what was allocated before."""
    from torch.profiler import record_function

    def step():
        out = model(tokens[:, :-1], tokens[:, 1:])
        with record_function(BACKWARD_MARK):
            out.loss.backward()

    return allocated_during(step)


def activation_checkpoint_report(model_name: str, batch: int, seq: int, n: int, t_max: int,
                                 variants=("baseline", "hc", "mhc")) -> list[StepMemoryRow]:
    """One step's memory for each variant x train.activation_checkpoint x residual.recompute, fp32."""
    from mhc_train.train.activation_checkpoint import MODES, apply_activation_checkpointing

    cfg = load_model_config(model_name)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    rows = []
    for variant in variants:
        for mode in MODES:
            for setting in ("off", "auto"):
                rcfg = ResidualConfig(variant=variant, n=n if variant != "baseline" else 1, t_max=t_max,
                                      recompute=setting)
                torch.manual_seed(0)
                model = MHCTransformer(cfg, rcfg).train()
                apply_activation_checkpointing(list(model.blocks), mode)
                step_memory(model, tokens)  # warm-up: lazily made state (RoPE tables, thread pools)
                model.zero_grad(set_to_none=True)
                kept, peak = step_memory(model, tokens)
                rows.append(StepMemoryRow(variant, mode, setting, kept, peak, batch * seq))
                del model
    return rows


def print_activation_checkpoint(rows: list[StepMemoryRow], header: str) -> None:
    mib = 2**20
    print(header)
    print("| variant | activation_checkpoint | residual.recompute | kept for backward (MiB) | step peak (MiB) "
          "| peak vs none |")
    print("|---|---|---|---:|---:|---:|")
    base = {r.variant: r.peak_bytes for r in rows if r.activation_checkpoint == "none" and r.recompute == "off"}
    for r in rows:
        print(f"| {r.variant} | {r.activation_checkpoint} | {r.recompute} | {r.kept_bytes / mib:.1f} | "
              f"{r.peak_bytes / mib:.1f} | {r.peak_bytes / base[r.variant]:.2f}x |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--t-max", type=int, default=20)
    p.add_argument("--activation-checkpoint", action="store_true",
                   help="one step's CPU memory for each train.activation_checkpoint x residual.recompute")
    p.add_argument("--json", type=Path, default=None, help="with --activation-checkpoint: write the rows here")
    args = p.parse_args(argv)
    cfg = load_model_config(args.model)
    if args.activation_checkpoint:
        rows = activation_checkpoint_report(args.model, args.batch, args.seq, args.n, args.t_max)
        header = (f"model={args.model} C={cfg.dim} L={cfg.n_layers} blocks n={args.n} batch={args.batch} "
                  f"seq={args.seq} ({args.batch * args.seq} tokens), fp32, CPU, torch {torch.__version__}; "
                  "bytes above the weights, gradients included")
        print_activation_checkpoint(rows, header)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "what": "one training step (forward + backward) on CPU: bytes alive when backward starts and the "
                        "step's peak, above what was allocated before it (weights); gradients included",
                "command": "mhc-train-memory --activation-checkpoint " + " ".join(
                    f"--{k.replace('_', '-')} {v}" for k, v in (("model", args.model), ("batch", args.batch),
                                                               ("seq", args.seq), ("n", args.n),
                                                               ("t_max", args.t_max))),
                "model": args.model, "dim": cfg.dim, "n_layers": cfg.n_layers, "n": args.n, "batch": args.batch,
                "seq": args.seq, "precision": "fp32", "torch": torch.__version__,
                "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
        return
    rows = report(args.model, args.batch, args.seq, args.n, args.t_max)
    print(f"model={args.model} C={cfg.dim} L={cfg.n_sublayers} sublayers n={args.n} tokens={args.batch * args.seq}, fp32")
    print("bytes kept for backward per token per sublayer (residual stream = Table 3's quantity)")
    header = f"{'variant':<9}{'recompute':>10}{'L_r':>5}{'residual':>11}{'(x C*4)':>9}{'Table 3':>10}{'diff':>8}{'attn/MoE':>11}{'other/tok':>11}"
    print(header)
    unit = cfg.dim * 4
    base_off = {r.variant: r.residual_bytes for r in rows if r.recompute == "off"}
    for r in rows:
        t3 = f"{r.table3_bytes:>10.0f}" if r.table3_bytes else f"{'-':>10}"
        diff = f"{(r.residual_bytes / r.table3_bytes - 1) * 100:>+7.1f}%" if r.table3_bytes else f"{'':>8}"
        print(f"{r.variant:<9}{r.recompute:>10}{(r.block_size or '-'):>5}{r.residual_bytes:>11.0f}"
              f"{r.residual_bytes / unit:>9.2f}{t3}{diff}{r.layer_bytes:>11.0f}{r.other_bytes:>11.0f}")
    for v in ("hc", "mhc"):
        on = next(r for r in rows if r.variant == v and r.recompute == "auto")
        print(f"{v}: recomputation keeps {on.residual_bytes / base_off[v]:.2f}x the residual-stream bytes "
              f"({base_off[v] / unit:.2f} -> {on.residual_bytes / unit:.2f} C*4 per token per sublayer)")


if __name__ == "__main__":
    main()
