"""Tokenize a document source into packed token shards (see ``meta.py`` for the format).

Order of work, chosen so that failures never leave a directory that looks usable:

1. load and check every split (missing files, bad UTF-8, empty data) - nothing written yet;
2. tokenize in parallel with ``Dataset.map(batched=True, num_proc=...)``, in a scratch cache;
3. remove any old ``meta.json`` (the directory is now "incomplete" to every reader);
4. write shards, each under a temporary name, renamed into place when full;
5. write ``meta.json`` last, atomically.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import atomic
from .errors import DataError
from .meta import FORMAT, META_NAME, TOKENIZER_NAME, VERSION, dtype_name, token_dtype
from .sources import Source, load_split, progress_bars
from .tokenizer import Tokenizer

DEFAULT_SHARD_TOKENS = 1 << 28  # 256 Mi tokens = 512 MiB of uint16: few files, cheap to mmap

_WORKER_TOKENIZERS: dict[str, Tokenizer] = {}  # per-process cache; map workers load the model once


def _split_docs(batch: dict, doc_separator: str | None) -> dict:
    """``Dataset.map`` function: records -> non-empty documents (split on ``doc_separator``).

    A separate, cheap pass so that a source made of a few huge records (a whole text file per
    record) still yields many rows for the parallel tokenization pass to spread over processes.
    """
    docs = []
    for text in batch["text"]:
        if text:
            docs.extend(d for d in (text.split(doc_separator) if doc_separator else (text,)) if d)
    return {"text": docs}


def _tokenize_batch(batch: dict, model_path: str) -> dict:
    """``Dataset.map`` function: documents -> token ids with EOS appended, and their lengths.

    Module-level (not a closure) with the model *path* as argument so worker processes can pickle
    it cheaply and load the model once each.
    """
    tok = _WORKER_TOKENIZERS.get(model_path)
    if tok is None:
        tok = _WORKER_TOKENIZERS[model_path] = Tokenizer(model_path)
    ids = tok.encode_batch(batch["text"])
    eos = tok.eos_id
    for row in ids:
        row.append(eos)
    return {"ids": ids, "n": [len(r) for r in ids]}


def _tokenize(ds, tokenizer: Tokenizer, source: Source, num_proc: int):
    import datasets

    ds = ds.map(_split_docs, batched=True, batch_size=64, remove_columns=ds.column_names,
                fn_kwargs={"doc_separator": source.doc_separator}, desc="splitting documents")
    features = datasets.Features({"ids": datasets.List(datasets.Value("int32")), "n": datasets.Value("int64")})
    # Each worker costs ~1 s to start; only worth it with enough documents to share out.
    num_proc = max(1, min(num_proc, len(ds) // 8))
    return ds.map(
        _tokenize_batch, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
        remove_columns=ds.column_names, features=features, desc="tokenizing",
        fn_kwargs={"model_path": str(tokenizer.path)},
    )


def _hold_out(ds, fraction: float, seed: int):
    """Split documents into (train, validation) by a seeded random choice; keeps train in order."""
    n = len(ds)
    k = max(1, round(n * fraction))
    if n < 2 or k >= n:
        raise DataError(f"cannot hold out {fraction:.1%} of {n} document(s) for validation; "
                        "give validation files or set val_fraction=0")
    val = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
    keep = np.ones(n, dtype=bool)
    keep[val] = False
    return ds.select(np.flatnonzero(keep)), ds.select(val)


class _ShardWriter:
    """Streams token arrays into ``{split}_{i:05d}.bin`` files of at most ``shard_tokens`` tokens."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._ctx = self._file = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None:
                name = f"{self.split}_{len(self.shards):05d}.bin"
                self._ctx = atomic.atomic_open(self.out_dir / name, "wb")
                self._file, self._name, self._count = self._ctx.__enter__(), name, 0
            take = min(len(tokens), self.shard_tokens - self._count)
            self._file.write(tokens[:take].tobytes())
            self._count += take
            tokens = tokens[take:]
            if self._count == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        self._ctx.__exit__(None, None, None)  # fsync + rename into place
        self.shards.append({"file": self._name, "num_tokens": self._count})
        self._ctx = self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._finish()

    def abort(self, exc: BaseException) -> None:
        if self._ctx is not None:  # removes the temporary file; no final name ever appears
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            self._ctx = self._file = None


def _write_split(tokenized, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int,
                 progress: bool) -> dict[str, Any]:
    import pyarrow.compute as pc
    from tqdm.auto import tqdm

    total = int(pc.sum(tokenized.with_format("arrow")["n"]).as_py())  # honours select() indices
    writer = _ShardWriter(out_dir, split, dtype, shard_tokens)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"writing {split}", disable=not progress)
    try:
        for table in tokenized.with_format("arrow").iter(batch_size=4096):
            # Flatten the list<int32> column in Arrow: no per-token (or per-document) Python.
            for chunk in table.column("ids").chunks:
                arr = chunk.flatten().to_numpy(zero_copy_only=False)
                writer.write(arr)
                bar.update(len(arr))
        writer.close()
    except BaseException as e:
        writer.abort(e)
        raise
    finally:
        bar.close()
    written = sum(s["num_tokens"] for s in writer.shards)
    assert written == total, (written, total)
    return {"num_tokens": total, "num_documents": len(tokenized), "shards": writer.shards}


def prepare_dataset(
    source: Source,
    tokenizer: Tokenizer | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_proc: int | None = None,
    val_fraction: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize ``source`` into ``out_dir`` (train and validation splits); returns the meta dict.

    If the source has no validation split, ``val_fraction`` of the train documents (seeded choice,
    at least one) are held out instead; ``val_fraction=0`` prepares train only. ``extra_meta`` is
    stored under ``meta["extra"]`` (the bundled dataset records its recipe version there).
    """
    tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    out_dir = Path(out_dir)
    if shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens} must be positive")
    if "train" not in source.splits():
        raise DataError("the source has no 'train' split")
    dtype = token_dtype(tokenizer.vocab_size)
    num_proc = num_proc or min(8, os.cpu_count() or 1)
    created = not out_dir.exists()  # if we made it and fail, we remove it: nothing half-made stays
    out_dir.mkdir(parents=True, exist_ok=True)
    # Scratch Arrow cache on the output's file system (it can be as big as the output itself).
    scratch = Path(tempfile.mkdtemp(prefix=".hf-cache-", dir=out_dir))
    tokenized: dict[str, Any] = {}
    writing = False
    try:
        with progress_bars(progress):
            # 1-2: load, check and tokenize everything before touching existing outputs.
            where: dict[str, str] = {}
            for split in source.splits():
                ds, where[split] = load_split(source, split, cache_dir=scratch)
                tokenized[split] = _tokenize(ds, tokenizer, source, num_proc)
                if len(tokenized[split]) == 0:
                    raise DataError(f"{where[split]}: no non-empty documents")
            if "validation" not in tokenized and val_fraction > 0:
                tokenized["train"], tokenized["validation"] = _hold_out(tokenized["train"], val_fraction, seed)
                where["validation"] = f"{val_fraction:g} of {where['train']} (seed {seed})"

        # 3-5: invalidate, write shards, then meta.json.
        writing = True
        (out_dir / META_NAME).unlink(missing_ok=True)
        _remove_shards(out_dir, tokenized)
        tok_file = out_dir / TOKENIZER_NAME
        if tokenizer.path.resolve() != tok_file.resolve():
            atomic.write_bytes(tok_file, tokenizer.path.read_bytes())
        splits = {split: _write_split(t, out_dir, split, dtype, shard_tokens, progress)
                  for split, t in tokenized.items()}
        for split, info in splits.items():
            info["source"] = _relative_to(where[split], out_dir)
        described = source.describe()
        described["files"] = {k: [_relative_to(f, out_dir) for f in v] for k, v in described["files"].items()}
        meta = {
            "format": FORMAT, "version": VERSION,
            "dtype": dtype_name(dtype), "byteorder": "little",
            "tokenizer": {"file": TOKENIZER_NAME, "sha256": tokenizer.sha256,
                          "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                          "bos_id": tokenizer.bos_id},
            "source": described,
            "splits": splits,
            "num_tokens": sum(s["num_tokens"] for s in splits.values()),
            "extra": extra_meta or {},
        }
        atomic.write_json(out_dir / META_NAME, meta)
        return meta
    except BaseException:
        if created:
            tokenized.clear()
            shutil.rmtree(out_dir, ignore_errors=True)
        elif writing:  # shards of an unfinished run are useless without meta.json
            _remove_shards(out_dir, tokenized)
        raise
    finally:
        tokenized.clear()  # drop datasets' handles on the scratch Arrow files before deleting them
        shutil.rmtree(scratch, ignore_errors=True)


def _relative_to(path: str, out_dir: Path) -> str:
    """Paths inside ``out_dir`` are recorded relative to it, so the directory stays valid when moved
    (the bundled dataset is built in a temporary directory and renamed into place)."""
    try:
        return str(Path(path).resolve().relative_to(out_dir.resolve()))
    except (ValueError, OSError):
        return path


def _remove_shards(out_dir: Path, splits) -> None:
    for split in splits:
        for old in out_dir.glob(f"{split}_*.bin"):
            old.unlink(missing_ok=True)
