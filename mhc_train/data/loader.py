"""Batches of packed token sequences from a prepared directory, memory-mapped.

A split is cut into non-overlapping windows of ``seq_len + 1`` tokens (the extra token is the last
target), never across a shard boundary. A batch is ``(inputs, targets)``, two ``int64`` tensors of
shape ``[batch_size, seq_len]`` with ``targets`` shifted one token to the left of ``inputs``.
Documents are packed back to back with EOS between them, so windows span document boundaries; that
is the standard pretraining set-up and wastes no tokens on padding.

``document_mask=True`` adds a third tensor, ``segment_ids`` (``int64 [batch_size, seq_len]``): the
index of each input token's document within its window (0 for the first, possibly partial one; an
EOS belongs to the document it ends). The model masks attention between documents and restarts
RoPE positions at each (``MHCTransformer.forward(tokens, targets, segment_ids)``).

Token ids are checked against the vocabulary when a split is opened (meta.json's largest id and a
cheap scan, ``meta.check_token_ids``) and in every batch (one max over it), so a damaged shard
stops with its file named, never with an IndexError inside the embedding.

Cost per batch is ``batch_size`` slices of a memory map plus one copy: no per-token Python.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import torch

from .errors import DataError
from .meta import VOCAB_FIX, check_token_ids, read_meta, shard_files


def segment_ids(inputs: np.ndarray, eos_id: int) -> np.ndarray:
    """Document index of each token of ``inputs [B, S]`` within its row: +1 after every EOS."""
    seg = np.zeros(inputs.shape, dtype=np.int64)
    np.cumsum(inputs[:, :-1] == eos_id, axis=1, out=seg[:, 1:])
    return seg


class PackedTokens:
    """Random access to the ``seq_len + 1``-token windows of one split."""

    def __init__(self, path: str | os.PathLike, split: str, seq_len: int, document_mask: bool = False):
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be >= 1")
        self.path, self.split, self.seq_len = str(path), split, seq_len
        self.meta = read_meta(path)
        files = shard_files(path, self.meta, split)
        self.vocab_size = int(self.meta["tokenizer"]["vocab_size"])
        self.eos_id = int(self.meta["tokenizer"]["eos_id"]) if document_mask else None
        recorded = self.meta["splits"][split].get("max_token_id", -1)
        if recorded >= self.vocab_size:
            raise DataError(f"{self.path}/meta.json: {split} split holds token id {recorded}, beyond its "
                            f"tokenizer's {self.vocab_size} ids; {VOCAB_FIX}")
        check_token_ids(files, self.meta["dtype"], self.vocab_size)
        self._files = [f for f, _ in files]
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self._arrays = [np.memmap(f, dtype=dtype, mode="r", shape=(n,)) for f, n in files]
        counts = [max(0, (n - 1) // seq_len) for _, n in files]
        self._first = np.cumsum([0] + counts)  # global index of each shard's first window
        self.num_tokens = sum(n for _, n in files)
        self.num_sequences = int(self._first[-1])

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """Windows ``idx`` as an ``int64`` array of shape ``[len(idx), seq_len + 1]``."""
        shard = np.searchsorted(self._first, idx, side="right") - 1
        start = (idx - self._first[shard]) * self.seq_len
        out = np.empty((len(idx), self.seq_len + 1), dtype=np.int64)
        for row, (s, o) in enumerate(zip(shard.tolist(), start.tolist())):
            out[row] = self._arrays[s][o:o + self.seq_len + 1]
        if len(out) and int(out.max()) >= self.vocab_size:
            row, col = (int(i[0]) for i in np.nonzero(out >= self.vocab_size))
            raise DataError(f"{self._files[shard[row]]}: token id {int(out[row, col])} at token {start[row] + col} "
                            f"is beyond the vocabulary ({self.vocab_size} ids in meta.json); {VOCAB_FIX}")
        return out

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        """``(inputs, targets)``, and ``segment_ids`` with ``document_mask``."""
        seqs = self.gather(idx)
        inputs = np.ascontiguousarray(seqs[:, :-1])
        out = (torch.from_numpy(inputs), torch.from_numpy(np.ascontiguousarray(seqs[:, 1:])))
        if self.eos_id is None:
            return out
        return (*out, torch.from_numpy(segment_ids(inputs, self.eos_id)))

    def too_small(self, need: int, what: str) -> DataError:
        return DataError(f"{self.path} [{self.split}]: {self.num_tokens} tokens make {self.num_sequences} "
                         f"sequences of {self.seq_len + 1} tokens; {what} needs at least {need}")


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")


class PackedLoader:
    """Endless, deterministic, resumable training batches for one data-parallel rank.

    Each epoch shuffles all window indices with a generator seeded by ``(seed, epoch)`` (so every
    epoch has a new order, and every run with the same seed the same orders), trims the order to a
    multiple of ``world_size`` and gives rank ``r`` the entries ``r, r + world_size, ...``: ranks are
    disjoint, equally long (no rank waits at a collective for a batch that never comes), and together
    cover every window except fewer than ``world_size * batch_size`` left over per epoch.

    Position is ``(epoch, index)``, index = batches already taken this epoch. It is the same on every
    rank, so saving rank 0's ``state_dict()`` is enough to resume all ranks exactly.
    """

    def __init__(self, path: str | os.PathLike, *, seq_len: int, batch_size: int, split: str = "train",
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 document_mask: bool = False):
        _check_rank(rank, world_size)
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        self.data = PackedTokens(path, split, seq_len, document_mask)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = self.data.num_sequences // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise self.data.too_small(batch_size * world_size, f"batch_size {batch_size} x world_size {world_size}")
        self.epoch, self.index = 0, 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def _rank_order(self, epoch: int) -> np.ndarray:
        n = self.data.num_sequences
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        mine = order[: n - n % self.world_size][self.rank::self.world_size]
        return mine[: self.batches_per_epoch * self.batch_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self._rank_order(self.epoch), self.epoch
        b = self.batch_size
        idx = self._order[self.index * b:(self.index + 1) * b]
        self.index += 1  # advanced before returning: state_dict() now points at the next batch
        return self.data.batch(idx)

    def _fingerprint(self) -> dict[str, Any]:
        # Everything that must be equal for (epoch, index) to mean the same batches after a resume.
        return {"seed": self.seed, "seq_len": self.data.seq_len, "batch_size": self.batch_size,
                "world_size": self.world_size, "shuffle": self.shuffle, "split": self.data.split,
                "num_sequences": self.data.num_sequences,
                "tokenizer_sha256": self.data.meta["tokenizer"]["sha256"]}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self._fingerprint().items() if state.get(k) != v}
        if mismatched:
            diff = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
            raise DataError(f"{self.data.path}: cannot resume data position exactly ({diff})")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class ValidationLoader:
    """A fixed, unshuffled set of validation batches; iterate it again for the same batches.

    ``max_batches`` per rank are taken from windows spread evenly over the whole split (not just
    its beginning, which would measure loss on the first document only), interleaved across ranks.
    """

    def __init__(self, path: str | os.PathLike, *, seq_len: int, batch_size: int,
                 max_batches: int | None = None, split: str = "validation", rank: int = 0,
                 world_size: int = 1, document_mask: bool = False):
        _check_rank(rank, world_size)
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        self.data = PackedTokens(path, split, seq_len, document_mask)
        n = self.data.num_sequences
        per_rank = n // world_size // batch_size
        self.num_batches = per_rank if max_batches is None else min(per_rank, max_batches)
        if self.num_batches < 1:
            raise self.data.too_small(batch_size * world_size, f"batch_size {batch_size} x world_size {world_size}")
        m = self.num_batches * batch_size * world_size
        chosen = (np.arange(m, dtype=np.int64) * n) // m  # distinct and evenly spaced since m <= n
        self._idx = chosen[rank::world_size]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        b = self.batch_size
        for i in range(self.num_batches):
            yield self.data.batch(self._idx[i * b:(i + 1) * b])
