"""Peak CPU memory of one loss forward+backward: the plain full-vocabulary cross-entropy against
the chunked one (mhc_train/model/chunked_loss.py), over the output projection.

    python -m mhc_train.bench.loss_memory [--vocab 32768,129280] [--tokens 4096] [--dim 256]
                                          [--chunk 1024] [--dtype fp32] [--threads 2] [--json PATH]

Each (vocabulary, loss) runs in a fresh subprocess: hidden states [tokens, dim] and a head weight
[vocab, dim] (both requiring grad), ~10% of the targets ignored; one forward+backward at a small
token count first (library start-up allocations), then the measured one. Plain is what
``MHCTransformer.forward`` does: logits = hidden @ W^T kept alive until backward returns (the
output holds them), ``F.cross_entropy(logits.float(), ...)``; chunked is
``chunked_cross_entropy(hidden, W, targets, chunk)``.

How memory is measured: torch's CPU allocator has no statistics, and tracemalloc does not see its
allocations, so the process's resident set is used. glibc is told to serve every allocation of
64 KiB or more with its own mmap (``GLIBC_TUNABLES`` mmap_threshold), so a freed tensor leaves the
resident set at once and the resident set tracks live tensors. The kernel's high-water mark is
reset just before the step (``/proc/self/clear_refs`` 5; where that is refused, the lifetime
``ru_maxrss`` is read instead, which the warm-up at a small size keeps meaningful); the figure
is high-water minus the resident set at that moment, so it counts everything the step allocates
(including the two gradients it returns, the same in both modes) and nothing it found there.
Linux only. Paste the table into docs/benchmarks.md with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
MIB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_high_water() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(mode: str, vocab: int, tokens: int, dim: int, chunk: int, dtype_name: str) -> dict:
    """One measurement in this (fresh) process; returns the row."""
    import torch
    import torch.nn.functional as F

    from mhc_train.model.chunked_loss import chunked_cross_entropy

    dtype = getattr(torch, DTYPES[dtype_name])

    def inputs(n: int):
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(n, dim, generator=g).to(dtype).requires_grad_()
        weight = (torch.randn(vocab, dim, generator=g) * dim**-0.5).to(dtype).requires_grad_()
        targets = torch.randint(0, vocab, (n,), generator=g)
        targets[torch.rand(n, generator=g) < 0.1] = -100
        return hidden, weight, targets

    def step(hidden, weight, targets) -> float:
        if mode == "plain":
            logits = hidden @ weight.t()  # kept until backward returns, as LMOutput keeps it
            loss = F.cross_entropy(logits.float(), targets, ignore_index=-100)
            loss.backward()
            del logits
        else:
            loss = chunked_cross_entropy(hidden, weight, targets, chunk)
            loss.backward()
        return loss.item()

    step(*inputs(min(tokens, 256)))  # start-up allocations (thread pools, kernels) out of the way
    hidden, weight, targets = inputs(tokens)
    reset = _reset_high_water()
    before_kib = _status_kib("VmRSS")
    before_max_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = step(hidden, weight, targets)
    seconds = time.perf_counter() - start
    peak_kib = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if not reset:  # a start-up peak above the resident set would hide part of the step's
        before_kib = max(before_kib, before_max_kib)
    return {"loss": mode, "vocab": vocab, "tokens": tokens, "dim": dim, "chunk": chunk if mode == "chunked" else None,
            "dtype": dtype_name, "peak_mib": (peak_kib - before_kib) / 1024, "seconds": seconds,
            "loss_value": loss, "method": "VmHWM after clear_refs" if reset else "ru_maxrss",
            "logits_fp32_mib": tokens * vocab * 4 / MIB}


def measure(mode: str, vocab: int, tokens: int, dim: int, chunk: int, dtype: str, threads: int | None) -> dict:
    """``child`` in a fresh interpreter, with glibc returning large frees to the system at once."""
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536", MALLOC_MMAP_THRESHOLD_="65536")
    root = str(Path(__file__).resolve().parents[2])  # the child imports this package, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "mhc_train.bench.loss_memory", "--child", mode, str(vocab), str(tokens),
           str(dim), str(chunk), dtype]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> list[str]:
    lines = [f"{'vocab':>8}{'tokens':>8}{'dim':>6}  {'loss':<16}{'peak MiB':>10}{'vs plain':>10}{'seconds':>9}"
             f"{'loss value':>12}"]
    plain = {(r["vocab"], r["tokens"]): r["peak_mib"] for r in rows if r["loss"] == "plain"}
    for r in rows:
        name = r["loss"] if r["chunk"] is None else f"chunked {r['chunk']}"
        ratio = r["peak_mib"] / plain[(r["vocab"], r["tokens"])] if (r["vocab"], r["tokens"]) in plain else float("nan")
        lines.append(f"{r['vocab']:>8}{r['tokens']:>8}{r['dim']:>6}  {name:<16}{r['peak_mib']:>10.0f}{ratio:>10.2f}"
                     f"{r['seconds']:>9.2f}{r['loss_value']:>12.6f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        mode, vocab, tokens, dim, chunk, dtype = argv[1:7]
        print(json.dumps(child(mode, int(vocab), int(tokens), int(dim), int(chunk), dtype)))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", default="32768,129280", help="vocabulary sizes [32768,129280]")
    p.add_argument("--tokens", type=int, default=4096, help="tokens in the batch [4096]")
    p.add_argument("--dim", type=int, default=256, help="hidden width C [256]")
    p.add_argument("--chunk", default="1024", help="chunk sizes in tokens, comma-separated [1024]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of each measurement")
    p.add_argument("--json", help="write the results as JSON")
    args = p.parse_args(argv)
    vocabs = [int(v) for v in args.vocab.split(",")]
    chunks = [int(c) for c in args.chunk.split(",")]
    if min(vocabs) < 2 or args.tokens < 1 or args.dim < 1 or min(chunks) < 1:
        p.error("--vocab >= 2, --tokens, --dim and --chunk >= 1")

    rows = []
    for vocab in vocabs:
        rows.append(measure("plain", vocab, args.tokens, args.dim, 0, args.dtype, args.threads))
        rows.extend(measure("chunked", vocab, args.tokens, args.dim, c, args.dtype, args.threads) for c in chunks)
    dev = f"CPU ({platform.processor() or platform.machine()})"
    print(f"loss forward+backward peak memory above the step's start, {args.dtype}, {dev}, "
          f"measured by {rows[0]['method']}")
    print("\n".join(table(rows)))
    if args.json:
        import torch

        report = {"device": dev, "torch": torch.__version__, "threads": args.threads,
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(["python -m mhc_train.bench.loss_memory", *argv]), "results": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
