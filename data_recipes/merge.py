"""Join parts prepared on several machines (``prepare --part i/N``, each into its own directory).

    python -m data_recipes.merge data/corpus part0/ part1/ part2/

Checks that the parts share one plan (same inputs, tokenizer and settings) and together hold
every unit, hard-links (or copies) their shards into the output and writes meta.json; the result
is byte-identical to a preparation in one piece. The output may be one of the parts.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data_recipes/x.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_recipes._cli import parser, print_summary, run  # noqa: E402
from mhc_train.data import merge_parts   # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = parser("merge", __doc__)
    p.add_argument("out_dir", type=Path, help="the merged prepared directory")
    p.add_argument("parts", type=Path, nargs="+", help="part directories")
    args = p.parse_args(argv)
    print_summary(args.out_dir, merge_parts(args.out_dir, args.parts))
    return 0


if __name__ == "__main__":
    run(main)
