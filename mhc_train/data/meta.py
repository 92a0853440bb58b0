"""The on-disk format of a prepared dataset and its checks.

A prepared directory holds::

    meta.json              written last: its presence means "complete"
    tokenizer.model        the tokenizer the ids came from (sha256 in meta.json): a SentencePiece
      or tokenizer.json    model, or a Hugging Face tokenizer.json (+ tokenizer_config.json)
    train_00000.bin ...    flat little-endian token ids, EOS after every document
    validation_00000.bin
    progress/              the preparation's plan and per-unit records (``progress.py``)

meta.json records, per split, each shard's token count and sha256 and the largest token id, so a
truncated or swapped shard is caught by its byte size before a single batch is read, and ids
beyond the vocabulary by the recorded maximum and a cheap scan when the data is opened
(``check_token_ids``); ``verify_prepared(full=True)`` reads everything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import DataError

FORMAT = "mhc-train-packed-tokens"
VERSION = 1
META_NAME = "meta.json"
TOKENIZER_NAME = "tokenizer.model"  # the SentencePiece model's name (tokenizer.json: Hugging Face)


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id: uint16 halves disk and page-cache use."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    return np.dtype(dtype).name  # "uint16" / "uint32"; byte order is always little, see meta


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Load and sanity-check ``path/meta.json``; DataError names the directory and the problem."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: prepared dataset directory does not exist")
    meta_path = path / META_NAME
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: missing (not a prepared dataset, or preparation did not finish)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(f"{meta_path}: format {meta.get('format')!r} v{meta.get('version')}, "
                        f"expected {FORMAT!r} v{VERSION}")
    for key in ("dtype", "tokenizer", "splits"):
        if key not in meta:
            raise DataError(f"{meta_path}: no {key!r} entry")
    return meta


def shard_files(path: str | os.PathLike, meta: Mapping[str, Any], split: str) -> list[tuple[Path, int]]:
    """(file, num_tokens) for each shard of ``split``, after checking each file's byte size."""
    path = Path(path)
    if split not in meta["splits"]:
        raise DataError(f"{path}: no {split!r} split (has {sorted(meta['splits'])})")
    itemsize = np.dtype(meta["dtype"]).itemsize
    out = []
    for shard in meta["splits"][split]["shards"]:
        f = path / shard["file"]
        n = int(shard["num_tokens"])
        if not f.is_file():
            raise DataError(f"{f}: shard listed in meta.json is missing")
        size = f.stat().st_size
        if size != n * itemsize:
            raise DataError(f"{f}: {size} bytes, but meta.json says {n} tokens x {itemsize} bytes = "
                            f"{n * itemsize} (truncated or replaced shard)")
        out.append((f, n))
    return out


VOCAB_FIX = ("the data was prepared with another tokenizer than the one the model is sized for, or is damaged: "
             "prepare it again with the model's tokenizer (python -m data_recipes.prepare), or raise model.vocab_size")


def check_vocab(meta: Mapping[str, Any] | str | os.PathLike, model_vocab_size: int, *,
                allow_padding: bool = True) -> None:
    """Raise DataError unless a model with ``model_vocab_size`` embeddings can consume these ids.

    ``meta`` is a meta.json dict or a prepared directory. A model vocabulary *smaller* than the
    tokenizer's would index out of range. A larger one is allowed by default because models often
    pad the embedding to a multiple of 64/128 for speed; ``allow_padding=False`` demands equality.
    The largest id recorded at preparation must fit as well.
    """
    if isinstance(meta, (str, os.PathLike)):
        meta = read_meta(meta)
    tok_vocab = int(meta["tokenizer"]["vocab_size"])
    if model_vocab_size < tok_vocab or (not allow_padding and model_vocab_size != tok_vocab):
        raise DataError(f"tokenizer vocab_size {tok_vocab} does not match the model's vocab_size "
                        f"{model_vocab_size}")
    for split, info in meta["splits"].items():
        if info.get("max_token_id", -1) >= model_vocab_size:
            raise DataError(f"{split} split: token id {info['max_token_id']} (meta.json max_token_id) is beyond "
                            f"the model's vocab_size {model_vocab_size}; {VOCAB_FIX}")


def _blocks(n: int, budget: int, block: int) -> list[tuple[int, int]]:
    """Ranges of a shard of ``n`` tokens that a scan of ``budget`` tokens reads: all of it when it
    fits, else evenly spaced blocks that include its first and last tokens."""
    if n <= budget:
        return [(0, n)]
    block = max(1, min(block, budget // 2))
    starts = np.linspace(0, n - block, max(2, budget // block)).astype(np.int64)
    return [(int(a), int(a) + block) for a in starts]


def check_token_ids(files: list[tuple[Path, int]], dtype: Any, vocab_size: int, *,
                    budget: int | None = 1 << 22, block: int = 1 << 14) -> None:
    """Raise DataError naming the shard and offset of the first token id >= ``vocab_size``.

    About ``budget`` tokens are read in all, spread over the shards (each one's start, end and
    evenly spaced blocks; ~10 ms for the default 4 Mi from the page cache), or everything when None.
    """
    dtype = np.dtype(dtype).newbyteorder("<")
    per_file = None if budget is None else max(512, budget // max(1, len(files)))
    for f, n in files:
        if n == 0:
            continue
        data = np.memmap(f, dtype=dtype, mode="r", shape=(n,))
        for a, b in [(0, n)] if per_file is None else _blocks(n, per_file, block):
            bad = np.flatnonzero(data[a:b] >= vocab_size)
            if len(bad):
                i = a + int(bad[0])
                raise DataError(f"{f}: token id {int(data[i])} at token {i} is beyond the vocabulary "
                                f"({vocab_size} ids in meta.json); {VOCAB_FIX}")


def verify_prepared(path: str | os.PathLike, *, full: bool = False) -> dict[str, Any]:
    """Check a prepared directory: shard sizes and (cheap scan) ids; with ``full``, every id and
    every shard's sha256. Returns meta; raises DataError naming the first bad file."""
    import hashlib

    meta = read_meta(path)
    vocab = int(meta["tokenizer"]["vocab_size"])
    for split in meta["splits"]:
        files = shard_files(path, meta, split)
        check_token_ids(files, meta["dtype"], vocab, budget=None if full else 1 << 22)
        if full:
            for (f, _), shard in zip(files, meta["splits"][split]["shards"]):
                h = hashlib.sha256()
                with open(f, "rb") as fh:
                    while chunk := fh.read(1 << 24):
                        h.update(chunk)
                if shard.get("sha256") not in (None, h.hexdigest()):
                    raise DataError(f"{f}: sha256 differs from meta.json (damaged or replaced shard); prepare it again")
    return meta


def check_tokenizer(meta: Mapping[str, Any], tokenizer) -> None:
    """Raise DataError if ``tokenizer`` is not the one the prepared ids were made with."""
    want = meta["tokenizer"]["sha256"]
    if tokenizer.sha256 != want:
        raise DataError(f"{tokenizer.path}: sha256 {tokenizer.sha256[:12]}... differs from the "
                        f"prepared data's tokenizer {want[:12]}...")
