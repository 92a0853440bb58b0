"""How much of a CPU training step the data loader and the per-step logging take.

    python -m mhc_train.bench.trainer_overhead [--model small] [--batch 8] [--seq 256] [--steps 20]

Runs the trainer's pieces in the trainer's order for ``--steps`` steps of the bundled corpus:
``next(loader)`` (PackedLoader), forward + backward + AdamW step + router-bias update, and one
per-step train record through the JSONL sink and the progress bar (the W&B sink is off here: it
queues records to its own process). Reports the median time of each part and its share of the
step. Targets (issue: trainer): loader under 2%, logging under 1%.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mhc_train.data import PackedLoader, ensure_bundled_dataset
from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.residual import ResidualConfig
from mhc_train.train.metrics import JsonlSink, Metrics, ProgressBar


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--residual", default="mhc")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_model_config(args.model)
    data_dir = ensure_bundled_dataset(vocab_size=cfg.vocab_size)
    loader = iter(PackedLoader(data_dir, seq_len=args.seq, batch_size=args.batch, seed=0))
    torch.manual_seed(0)
    model = MHCTransformer(cfg, ResidualConfig(variant=args.residual)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    parts: dict[str, list[float]] = {"data": [], "compute": [], "logging": []}
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Metrics([JsonlSink(Path(tmp) / "metrics.jsonl"),
                           ProgressBar(total=args.steps, initial=0, desc="bench", enabled=True)])
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            inputs, targets = next(loader)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = model(inputs, targets)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loads = torch.stack([m.router.expert_load for m in model.moe_layers()])
            model.update_router_biases()
            loss = out.loss.item()  # the trainer syncs for the finite check too
            t2 = time.perf_counter()
            metrics.log({
                "kind": "train", "step": step, "loss": loss, "ce_loss": out.ce_loss.item(), "aux_loss": 0.0,
                "grad_norm": float(grad_norm), "lr": 1e-3, "tokens": step * inputs.numel(),
                "tokens_per_s": inputs.numel() / (t2 - t0), "step_time_s": t2 - t0,
                "load_imbalance": float((loads.max(dim=1).values / loads.mean(dim=1).clamp_min(1e-9)).mean()),
                "skipped": 0,
            })
            t3 = time.perf_counter()
            if step > 2:  # warm-up steps excluded
                parts["data"].append(t1 - t0)
                parts["compute"].append(t2 - t1)
                parts["logging"].append(t3 - t2)
        metrics.close()
    total = sum(statistics.median(v) for v in parts.values())
    print(f"\nmodel={args.model} residual={args.residual} batch={args.batch} seq={args.seq} "
          f"threads={torch.get_num_threads()} steps={len(parts['data'])} (after 2 warm-up)")
    print(f"{'part':<10}{'median ms':>11}{'share of step':>15}")
    for name, values in parts.items():
        med = statistics.median(values)
        print(f"{name:<10}{med * 1e3:>11.3f}{med / total * 100:>14.2f}%")


if __name__ == "__main__":
    main()
