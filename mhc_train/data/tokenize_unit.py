"""One work unit -> its shard file(s): the job of each preparation worker process.

A unit of the train split writes ``train_{unit}.bin`` and, when validation is carved out of train,
``validation_{unit}.bin``; a unit of the validation split writes ``validation_{unit}.bin``. Each
shard is written under a temporary name and renamed into place when complete, so a killed worker
leaves at most a temporary file. The returned record (token and document counts, largest id,
sha256 per shard) is what the coordinator stores as the unit's "done" mark.

Carving: with ``every`` = round(1 / val_fraction), document j of unit u goes to validation when
(j + offset_u) % every == 0, offset_u a hash of (seed, u): one document in ``every``, spread over
the corpus, decided by the unit alone (so parts and resumes agree).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import atomic
from .errors import DataError
from .units import unit_documents

BATCH_CHARS = 1 << 20  # documents are encoded in batches of about this many characters

_STATE: dict[str, Any] = {}  # per process: plan, source, tokenizer, out_dir


def shard_name(split: str, unit: int) -> str:
    return f"{split}_{unit:05d}.bin"


def unit_outputs(plan: dict, split: str) -> list[str]:
    """The splits a unit of ``split`` writes shards for."""
    return ["train", "validation"] if split == "train" and plan["carve_every"] else [split]


def carve_offset(seed: int, unit: int, every: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{unit}".encode()).digest()[:8], "little") % every


def _die_with_parent(parent_pid: int) -> None:
    """A worker must not outlive a coordinator killed with SIGKILL (it would still be writing
    when the preparation is resumed): ask Linux to kill it with its parent."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)


def init_worker(plan: dict, source, tokenizer, out_dir: str, parent_pid: int | None = None) -> None:
    """Pool initializer (or the in-process set-up). ``tokenizer``: a loaded tokenizer, or
    ``(path, eos_token)`` to load once in this process."""
    if parent_pid is not None:
        _die_with_parent(parent_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    if isinstance(tokenizer, tuple):
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(*tokenizer)
    _STATE.update(plan=plan, source=source, tokenizer=tokenizer, out_dir=Path(out_dir))


def reset_worker() -> None:
    _STATE.clear()


class ShardWriter:
    """Appends token arrays to one shard (opened at the first tokens: an empty output makes no
    file) and keeps its count, largest id and sha256."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.num_tokens = self.num_documents = 0
        self.max_token_id = -1
        self._hash = hashlib.sha256()
        self._ctx = self._file = None

    def write(self, tokens: np.ndarray, documents: int) -> None:
        if not len(tokens):
            return
        if self._file is None:
            self._ctx = atomic.atomic_open(self.path, "wb")
            self._file = self._ctx.__enter__()
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.num_tokens += len(tokens)
        self.num_documents += documents
        self.max_token_id = max(self.max_token_id, int(tokens.max()))

    def close(self) -> dict[str, Any]:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)  # fsync + rename into place
            self._ctx = self._file = None
        return {"file": self.path.name if self.num_tokens else None, "num_tokens": self.num_tokens,
                "num_documents": self.num_documents, "max_token_id": self.max_token_id,
                "sha256": self._hash.hexdigest() if self.num_tokens else None}

    def abort(self, exc: BaseException) -> None:
        if self._ctx is not None:  # removes the temporary file; no final name ever appears
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            self._ctx = self._file = None


def _batches(docs, max_chars: int = BATCH_CHARS):
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_unit(task: tuple[str, int]) -> dict[str, Any]:
    """Tokenize unit ``task = (split, index)`` of the plan into its shards; returns its record."""
    t0, c0 = time.perf_counter(), time.process_time()
    plan, source, tok, out_dir = _STATE["plan"], _STATE["source"], _STATE["tokenizer"], _STATE["out_dir"]
    split, index = task
    split_plan = plan["splits"][split]
    dtype = np.dtype(plan["dtype"])
    vocab, eos = plan["tokenizer"]["vocab_size"], plan["tokenizer"]["eos_id"]
    outputs = unit_outputs(plan, split)
    writers = {s: ShardWriter(out_dir / shard_name(s, index), dtype) for s in outputs}
    every = plan["carve_every"] if len(outputs) == 2 else 0
    offset = carve_offset(plan["seed"], index, every) if every else 0
    doc_index, lossless = 0, True
    try:
        for docs in _batches(unit_documents(source, split_plan, split_plan["units"][index])):
            rows = {s: [] for s in outputs}
            for j, ids in enumerate(tok.encode_batch(docs, num_threads=1)):
                if doc_index == 0:  # a cheap check that the tokenizer is lossless on this data
                    lossless = tok.decode(ids) == docs[j]
                ids.append(eos)
                held = every and (doc_index + offset) % every == 0
                rows["validation" if held else outputs[0]].append(ids)
                doc_index += 1
            for s, lists in rows.items():
                n = sum(map(len, lists))
                tokens = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=n)
                if n and int(tokens.max()) >= vocab:
                    raise DataError(f"{plan['tokenizer']['file']}: the tokenizer produced id {int(tokens.max())} "
                                    f">= its vocab_size {vocab}")
                writers[s].write(tokens, len(lists))
        results = {s: w.close() for s, w in writers.items()}
    except BaseException as e:
        for w in writers.values():
            w.abort(e)
        raise
    return {"plan_id": plan["id"], "split": split, "unit": index, "outputs": results, "lossless": lossless,
            "seconds": round(time.perf_counter() - t0, 3), "cpu_seconds": round(time.process_time() - c0, 3)}
