"""Check a prepared directory: shard sizes and token ids (a sampled scan), or everything.

    python -m data_recipes.check data/shakespeare-v4096 [--full] [--vocab-size 129280]

--full reads every token (ids below the vocabulary) and every shard's sha256 against meta.json;
--vocab-size also checks the ids against a model's vocabulary.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data_recipes/x.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_recipes._cli import parser, print_summary, run  # noqa: E402
from mhc_train.data import check_vocab, verify_prepared   # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = parser("check", __doc__)
    p.add_argument("path", type=Path, help="prepared directory")
    p.add_argument("--full", action="store_true", help="read everything (ids and sha256)")
    p.add_argument("--vocab-size", type=int, help="the model's vocabulary size")
    args = p.parse_args(argv)
    meta = verify_prepared(args.path, full=args.full)
    if args.vocab_size is not None:
        check_vocab(meta, args.vocab_size)
    print_summary(args.path, meta)
    print("ok" + (" (every token and sha256 read)" if args.full else " (sizes, recorded ids, sampled scan)"))
    return 0


if __name__ == "__main__":
    run(main)
