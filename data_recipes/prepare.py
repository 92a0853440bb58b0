"""Tokenize a data source into packed token shards plus meta.json, for ``mhc_train.data.PackedLoader``.

    python -m data_recipes.prepare --train data/shakespeare/train.txt \\
        --validation data/shakespeare/val.txt --doc-separator '\\f\\n' \\
        --tokenizer tokenizer.model data/shakespeare-v4096

Without --validation, --val-fraction of the train documents are held out. Re-running into the same
directory replaces its contents; meta.json is written last, so an interrupted run is never mistaken
for a finished one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python data_recipes/x.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_recipes._cli import add_source_args, run, source_from_args  # noqa: E402
from mhc_train.data import prepare_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_recipes.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path, help="output directory (meta.json, tokenizer.model, *.bin)")
    p.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model file")
    add_source_args(p)
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="documents held out when there is no --validation (0: none)")
    p.add_argument("--num-proc", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    meta = prepare_dataset(source_from_args(args), args.tokenizer, args.out_dir, shard_tokens=args.shard_tokens,
                   num_proc=args.num_proc, val_fraction=args.val_fraction, seed=args.seed)
    for split, info in meta["splits"].items():
        print(f"{split:10s} {info['num_documents']:>9,d} docs {info['num_tokens']:>13,d} tokens "
              f"in {len(info['shards'])} shard(s)")
    print(f"{args.out_dir}: {meta['dtype']}, vocab {meta['tokenizer']['vocab_size']} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    run(main)
