"""``python -m data_recipes``: list the recipes; ``python -m data_recipes NAME ARGS``: run one."""

from __future__ import annotations

import importlib
import sys

RECIPES = {
    "corpus": "the bundled Shakespeare corpus -> train.txt, val.txt, NOTICE",
    "tokenizer": "train a lossless tokenizer: SentencePiece .model or byte-level BPE tokenizer.json",
    "prepare": "source -> packed token shards + meta.json (streaming, workers, resumable, --part i/N)",
    "merge": "join parts prepared on several machines into one directory",
    "check": "check a prepared directory (sizes, token ids, --full: sha256)",
}


def usage() -> str:
    rows = "\n".join(f"  {name:10s} {what}" for name, what in RECIPES.items())
    return (f"usage: python -m data_recipes RECIPE [ARGS]   (or python -m data_recipes.RECIPE [ARGS])\n\n"
            f"recipes:\n{rows}\n\n`python -m data_recipes RECIPE --help` for a recipe's arguments.")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in RECIPES:
        print(f"error: unknown recipe {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    from data_recipes._cli import run

    module = importlib.import_module(f"data_recipes.{argv[0]}")
    run(lambda: module.main(argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
