"""The on-disk format of a prepared dataset and its checks.

A prepared directory holds::

    meta.json              written last: its presence means "complete"
    tokenizer.model        the SentencePiece model the ids came from (sha256 in meta.json)
    train_00000.bin ...    flat little-endian token ids, EOS after every document
    validation_00000.bin

meta.json records, per split, each shard's token count, so a truncated or swapped shard is caught
by its byte size before a single batch is read.
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
TOKENIZER_NAME = "tokenizer.model"


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


def _vocab_of(meta: Any) -> int:
    if isinstance(meta, (str, os.PathLike)):
        meta = read_meta(meta)
    return int(meta["tokenizer"]["vocab_size"])


def check_vocab(meta: Mapping[str, Any] | str | os.PathLike, model_vocab_size: int, *,
                allow_padding: bool = True) -> None:
    """Raise DataError unless a model with ``model_vocab_size`` embeddings can consume these ids.

    ``meta`` is a meta.json dict or a prepared directory. A model vocabulary *smaller* than the
    tokenizer's would index out of range. A larger one is allowed by default because models often
    pad the embedding to a multiple of 64/128 for speed; ``allow_padding=False`` demands equality.
    """
    tok_vocab = _vocab_of(meta)
    if model_vocab_size < tok_vocab or (not allow_padding and model_vocab_size != tok_vocab):
        raise DataError(f"tokenizer vocab_size {tok_vocab} does not match the model's vocab_size "
                        f"{model_vocab_size}")


def check_tokenizer(meta: Mapping[str, Any], tokenizer) -> None:
    """Raise DataError if ``tokenizer`` is not the one the prepared ids were made with."""
    want = meta["tokenizer"]["sha256"]
    if tokenizer.sha256 != want:
        raise DataError(f"{tokenizer.path}: sha256 {tokenizer.sha256[:12]}... differs from the "
                        f"prepared data's tokenizer {want[:12]}...")
