"""Training step eager against ``train.compile=true`` (each block compiled, mhc_train/train/compile.py).

    python -m mhc_train.bench.compile_step [--models tiny,small] [--variants baseline,hc,mhc]
                                           [--steps 8] [--batch 8] [--threads 2] [--json PATH]

For each model size and residual variant, two copies of one model (same weights) train side by
side on the same batches: one eager, one with its blocks compiled (``apply_compile``, inductor).
Each step is forward, backward, AdamW and the router bias update, as the trainer runs it; the
two copies alternate step by step (in alternating order), so that load drifting on the machine
hits both alike. Reported:
the compiled copy's first step (compilation included) and compile time (that step less a
compiled step), the median step time of each after the first, their ratio, the largest loss
difference over the steps (the losses must agree to 1e-4 on CPU in fp32), and the graph breaks
dynamo recorded (0: ``apply_compile`` uses fullgraph, a break would have failed the step).
For scale, a third copy trains eagerly with another thread count (its reductions add in another
order): the largest loss difference to the eager run is the noise any change of summation order
makes, which training amplifies step by step.
Compile times are cold: inductor's on-disk caches start empty (a fresh directory), after one
trivial compile that pays the process's one-off costs; inside a run, blocks whose graphs are
identical (the MoE blocks of one model) reuse the first one's kernels, as in training.
``--warm-cache`` keeps inductor's usual cache directory instead.
Paste the table into docs/benchmarks.md with the machine it ran on; ``--json`` writes
docs/data/bench_compile.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.residual import ResidualConfig
from mhc_train.train.compile import apply_compile, graph_break_count

VARIANTS = ("baseline", "hc", "mhc")


class Trained:
    """One model with its optimizer; ``step`` is one training step, its loss and seconds."""

    def __init__(self, model: MHCTransformer, lr: float) -> None:
        self.model = model.train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr)
        self.losses: list[float] = []
        self.times: list[float] = []

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(inputs, targets).loss
        loss.backward()
        self.opt.step()
        self.model.update_router_biases()
        self.times.append(time.perf_counter() - start)
        self.losses.append(float(loss.detach()))


def measure(size: str, variant: str, args) -> dict:
    cfg = load_model_config(size)
    seq = min(args.seq or 256, cfg.max_seq_len)
    torch.manual_seed(0)
    model = MHCTransformer(cfg, ResidualConfig(variant=variant, backend="torch"))
    eager = Trained(model, args.lr)
    compiled = Trained(copy.deepcopy(model), args.lr)
    reordered = Trained(copy.deepcopy(model), args.lr)
    apply_compile(list(compiled.model.blocks), True, None, backend=args.backend)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, seq + 1), generator=gen) for _ in range(args.steps)]
    breaks = graph_break_count()
    threads = torch.get_num_threads()
    for i, tokens in enumerate(batches):
        for run in ((eager, compiled) if i % 2 == 0 else (compiled, eager)):
            run.step(tokens[:, :-1], tokens[:, 1:])
        torch.set_num_threads(1 if threads > 1 else 2)
        reordered.step(tokens[:, :-1], tokens[:, 1:])
        torch.set_num_threads(threads)
    eager_s, compiled_s = (statistics.median(r.times[1:]) for r in (eager, compiled))
    return {
        "model": size, "variant": variant, "n": ResidualConfig(variant=variant).streams,
        "params": sum(p.numel() for p in model.parameters()), "batch": args.batch, "seq": seq,
        "eager_step_ms": eager_s * 1e3, "compiled_step_ms": compiled_s * 1e3, "eager_over_compiled": eager_s / compiled_s,
        "first_compiled_step_s": compiled.times[0], "compile_s": compiled.times[0] - compiled_s,
        "max_loss_diff": max(abs(a - b) for a, b in zip(eager.losses, compiled.losses)),
        "max_loss_diff_eager_other_threads": max(abs(a - b) for a, b in zip(eager.losses, reordered.losses)),
        "graph_breaks": graph_break_count() - breaks,
        "eager_losses": eager.losses, "compiled_losses": compiled.losses,
        "eager_ms_all": [t * 1e3 for t in eager.times], "compiled_ms_all": [t * 1e3 for t in compiled.times],
    }


def table(rows: list[dict]) -> list[str]:
    """max |dloss|: compiled against eager; (threads): eager against eager on another thread count."""
    lines = [f"{'model':<7}{'variant':<10}{'tokens':>8}{'compile s':>11}{'eager ms':>10}{'compiled ms':>13}"
             f"{'speed-up':>10}{'max |dloss|':>13}{'(threads)':>11}{'breaks':>8}"]
    for r in rows:
        lines.append(f"{r['model']:<7}{r['variant']:<10}{r['batch'] * r['seq']:>8}{r['compile_s']:>11.1f}"
                     f"{r['eager_step_ms']:>10.1f}{r['compiled_step_ms']:>13.1f}{r['eager_over_compiled']:>9.2f}x"
                     f"{r['max_loss_diff']:>13.1e}{r['max_loss_diff_eager_other_threads']:>11.1e}{r['graph_breaks']:>8}")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,small", help="model configs [tiny,small]")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=8, help="training steps of each copy (the first compiles)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 256, capped at the model's)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--backend", default="inductor", help="torch.compile backend [inductor]")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--warm-cache", action="store_true", help="keep inductor's cache (default: a fresh one)")
    p.add_argument("--json", help="write the results as JSON (docs/data/bench_compile.json)")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    if args.steps < 2 or args.batch < 1 or not set(variants) <= set(VARIANTS):
        p.error(f"--steps >= 2, --batch >= 1, --variants from {','.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mhc-bench-compile-")
    torch.compile(lambda x: x.sin() + 1, backend=args.backend)(torch.ones(4))  # one-off costs
    rows = []
    for size in args.models.split(","):
        for variant in variants:
            rows.append(measure(size, variant, args))
            print(table(rows[-1:])[-1], flush=True)
    dev = f"CPU ({platform.processor() or platform.machine()})"
    command = " ".join(["python -m mhc_train.bench.compile_step", *(sys.argv[1:] if argv is None else argv)])
    print(f"training step (forward, backward, AdamW), fp32, eager vs blocks compiled ({args.backend}), "
          f"{args.steps} steps each, device={dev}, threads={torch.get_num_threads()}, torch={torch.__version__}")
    print("\n".join(table(rows)))
    if args.json:
        report = {"device": dev, "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
                  "backend": args.backend, "steps": args.steps, "cold_cache": not args.warm_cache, "results": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
