"""Train a lossless tokenizer (``decode(encode(text)) == text``) on a data source.

    python -m data_recipes.tokenizer --train data/shakespeare/train.txt --doc-separator '\\f\\n' \\
        --vocab-size 4096 tokenizer.model

OUT.model: SentencePiece with identity normalisation and byte fallback (see
``mhc_train/data/tokenizer.py`` for why each setting is what it is). OUT.json: a GPT-2-style
byte-level BPE ``tokenizer.json`` (Hugging Face ``tokenizers``, EOS ``<|endoftext|>``), the kind of
tokenizer DeepSeek-V3 uses.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python data_recipes/x.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_recipes._cli import add_source_args, parser, run, source_from_args  # noqa: E402
from mhc_train.data import DataError, train_bpe_json, train_tokenizer_from_source   # noqa: E402
from mhc_train.data.units import source_documents   # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = parser("tokenizer", __doc__)
    p.add_argument("model", type=Path, help="output: OUT.model (SentencePiece) or OUT.json (byte-level BPE), "
                                            "written atomically")
    add_source_args(p)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"],
                   help="bpe trains ~10x faster; unigram encodes faster")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="lines sampled for training (bounds time and memory)")
    p.add_argument("--max-documents", type=int, help="read at most this many documents")
    p.add_argument("--num-threads", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.model.suffix == ".json":
        if args.model_type != "bpe":
            raise DataError(f"{args.model}: a tokenizer.json is a byte-level BPE (--model-type bpe)")
        tok = train_bpe_json(source_documents(source_from_args(args), "train", args.max_documents), args.model,
                             vocab_size=args.vocab_size)
        print(f"{tok.path}: vocab {tok.vocab_size}, eos {tok.eos_token!r}, sha256 {tok.sha256} "
              f"({time.perf_counter() - t0:.1f} s)")
        return 0
    tok = train_tokenizer_from_source(
        source_from_args(args), args.model, vocab_size=args.vocab_size, model_type=args.model_type,
        input_sentence_size=args.input_sentence_size, max_documents=args.max_documents,
        num_threads=args.num_threads, seed=args.seed)
    print(f"{tok.path}: vocab {tok.vocab_size}, sha256 {tok.sha256} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    run(main)
