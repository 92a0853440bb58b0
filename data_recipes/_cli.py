"""Shared CLI plumbing: source arguments, the summary of a prepared directory and clean DataError
reporting."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from mhc_train.data import DataError, Source


def parser(recipe: str, doc: str) -> argparse.ArgumentParser:
    """The argument parser of ``python -m data_recipes.<recipe>``, its docstring as description."""
    return argparse.ArgumentParser(prog=f"python -m data_recipes.{recipe}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("source (local files or a hub dataset)")
    g.add_argument("--train", nargs="+", metavar="PATH",
                   help="train files, directories or globs (.txt/.md, .json/.jsonl, .parquet)")
    g.add_argument("--validation", nargs="+", metavar="PATH", help="validation files (optional)")
    g.add_argument("--hub", metavar="NAME", help="hub dataset name instead of files (needs network)")
    g.add_argument("--hub-config", metavar="NAME", help="hub dataset config")
    g.add_argument("--text-field", default="text", help="column with the text (json/parquet/hub)")
    g.add_argument("--sample-by", default="document", choices=["document", "paragraph", "line"],
                   help="what one record of a text file is (default: the whole file)")
    g.add_argument("--doc-separator", metavar="STR",
                   help=r"split records into documents at this string (Python escapes, e.g. '\f\n')")


def source_from_args(args: argparse.Namespace) -> Source:
    sep = args.doc_separator
    if sep:  # interpret Python escapes; latin-1 + backslashreplace keeps non-ASCII text intact
        sep = sep.encode("latin-1", "backslashreplace").decode("unicode_escape")
    files = {k: tuple(v) for k, v in (("train", args.train), ("validation", args.validation)) if v}
    return Source(files=files, hub_name=args.hub, hub_config=args.hub_config,
                  text_field=args.text_field, text_sample_by=args.sample_by, doc_separator=sep)


def print_summary(path, meta: dict) -> None:
    for split, info in meta["splits"].items():
        print(f"{split:10s} {info['num_documents']:>11,d} docs {info['num_tokens']:>15,d} tokens "
              f"in {len(info['shards'])} shard(s), max id {info.get('max_token_id', '?')}")
    tok = meta["tokenizer"]
    print(f"{path}: {meta['dtype']}, {tok.get('kind', 'sentencepiece')} tokenizer {tok['file']}, "
          f"vocab {tok['vocab_size']}, eos {tok['eos_id']}")


def run(main: Callable[[], int | None]) -> None:
    """Run ``main``; a DataError becomes ``error: <message>`` on stderr and exit status 2."""
    try:
        sys.exit(main() or 0)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
