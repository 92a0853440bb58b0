"""Tokenize a data source into packed token shards plus meta.json, for ``mhc_train.data.PackedLoader``.

    python -m data_recipes.prepare --train data/shakespeare/train.txt \\
        --validation data/shakespeare/val.txt --doc-separator '\\f\\n' \\
        --tokenizer tokenizer.model data/shakespeare-v4096

Streams the source (local files or, with --hub, a hub dataset) through --num-proc worker
processes, one unit of about --unit-mb of input at a time, each into its own shard. Interrupted
(crash, kill -9, Ctrl-C)? Run the same command again: it continues from the last finished units.
Several machines: run --part i/N on each (into one shared directory, or into their own and join
them with `python -m data_recipes.merge`). Without --validation (or a hub validation split), one
document in round(1 / --val-fraction) is held out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python data_recipes/x.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_recipes._cli import add_source_args, parser, print_summary, run, source_from_args  # noqa: E402
from mhc_train.data import DataError, prepare_dataset   # noqa: E402


def parse_part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected i/N, e.g. 0/4") from None
    return i, n


def main(argv: list[str] | None = None) -> int:
    p = parser("prepare", __doc__)
    p.add_argument("out_dir", type=Path, help="output directory (meta.json, tokenizer, *.bin, progress/)")
    p.add_argument("--tokenizer", type=Path, required=True,
                   help="SentencePiece .model, a tokenizer.json, or a Hugging Face tokenizer directory")
    p.add_argument("--eos-token", help="end-of-document token of a Hugging Face tokenizer "
                                       "(default: its tokenizer_config.json eos_token)")
    add_source_args(p)
    p.add_argument("--unit-mb", type=float, default=64, help="input per unit, hence per shard (MiB)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="held out when there is no validation split (0: none)")
    p.add_argument("--num-proc", type=int, default=min(8, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--part", type=parse_part, default=(0, 1), metavar="i/N",
                   help="prepare only part i of N (every N-th unit), e.g. one per machine")
    p.add_argument("--overwrite", action="store_true", help="replace another preparation in out_dir")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    records = []
    t0 = time.perf_counter()
    meta = prepare_dataset(source_from_args(args), args.tokenizer, args.out_dir, unit_bytes=int(args.unit_mb * 2**20),
                           num_proc=args.num_proc, val_fraction=args.val_fraction, seed=args.seed, part=args.part,
                           overwrite=args.overwrite, eos_token=args.eos_token, on_unit_done=records.append)
    wall = time.perf_counter() - t0
    tokens = sum(o["num_tokens"] for r in records for o in r["outputs"].values())
    busy, cpu = (max(1e-9, sum(r[k] for r in records)) for k in ("seconds", "cpu_seconds"))
    if records:
        print(f"this run: {len(records)} units, {tokens:,d} tokens in {wall:.1f} s = {tokens / wall:,.0f} tokens/s; "
              f"per worker process {tokens / busy:,.0f} tokens/s ({tokens / cpu:,.0f} per CPU second)")
    if meta is None:
        print(f"{args.out_dir}: part {args.part[0]}/{args.part[1]} done; the other parts are not yet")
        return 0
    print_summary(args.out_dir, meta)
    return 0


if __name__ == "__main__":
    run(main)
