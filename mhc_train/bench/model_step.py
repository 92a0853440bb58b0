"""Forward+backward throughput of baseline / HC / mHC side by side (issue: model core, item 8).

    python -m mhc_train.bench.model_step [--model small] [--batch 8] [--seq 256] [--repeats 7]

The variants are timed in interleaved rounds (A B C A B C ...) so that machine noise hits them
alike; the median step time of each is reported with its ratio to the baseline. Paste the
output into docs/benchmarks.md with the machine it ran on.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.residual import ResidualConfig

VARIANTS = {
    "baseline": dict(variant="baseline"),
    "hc": dict(variant="hc", n=4),
    "mhc": dict(variant="mhc", n=4, t_max=20),
}


def step_fn(model: MHCTransformer, tokens: torch.Tensor):
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()

    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default="baseline,hc,mhc")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    cfg = load_model_config(args.model)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    steps = {}
    for name in args.variants.split(","):
        model = MHCTransformer(cfg, ResidualConfig(**VARIANTS[name])).to(device).train()
        steps[name] = step_fn(model, tokens)
        for _ in range(args.warmup):
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)

    tokens_per_step = args.batch * args.seq
    base = statistics.median(times.get("baseline", next(iter(times.values()))))
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"model={args.model} batch={args.batch} seq={args.seq} repeats={args.repeats} device={dev} torch={torch.__version__}")
    base_min = min(times.get("baseline", next(iter(times.values()))))
    print(f"{'variant':<10}{'step ms (median)':>18}{'min ms':>10}{'tokens/s':>12}{'vs baseline':>13}{'min vs min':>12}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<10}{med * 1e3:>18.1f}{min(ts) * 1e3:>10.1f}{tokens_per_step / med:>12.0f}"
              f"{med / base:>12.3f}x{min(ts) / base_min:>11.3f}x")


if __name__ == "__main__":
    main()
