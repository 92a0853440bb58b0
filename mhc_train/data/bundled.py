"""The default training data: bundled Shakespeare corpus -> tokenizer -> packed shards, cached.

``ensure_bundled_dataset`` is what the trainer calls when no dataset is configured. It is
idempotent and safe to call from several processes at once (e.g. every rank of a job) without locks:
each caller that finds no complete cache builds into its own private temporary directory next to
the cache and then ``os.rename``s it into place. A rename onto an existing non-empty directory fails,
so exactly one build wins; the losers discard theirs and use the winner's. Readers therefore only
ever see a complete directory or none.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from .errors import DataError
from .meta import TOKENIZER_NAME, read_meta, shard_files
from .prepare import prepare_dataset
from .shakespeare import DOC_SEPARATOR, write_corpus
from .sources import Source
from .tokenizer import Tokenizer, train_tokenizer_from_source

# Bump when anything that changes the bundled output changes (corpus extraction, tokenizer or
# prepare settings): old caches then fail the completeness check and are rebuilt.
RECIPE_VERSION = 1


def default_cache_dir(vocab_size: int) -> Path:
    """``$MHC_TRAIN_CACHE/shakespeare-v{vocab}``, by default under ``~/.cache/mhc-train``."""
    root = Path(os.environ.get("MHC_TRAIN_CACHE", "~/.cache/mhc-train")).expanduser()
    return root / f"shakespeare-v{vocab_size}"


def _is_complete(path: Path, vocab_size: int) -> bool:
    """True if ``path`` holds a finished bundled build of this recipe version and vocab size."""
    try:
        meta = read_meta(path)
        for split in ("train", "validation"):
            shard_files(path, meta, split)
        if Tokenizer(path / TOKENIZER_NAME).sha256 != meta["tokenizer"]["sha256"]:
            return False
    except DataError:
        return False
    bundled = meta.get("extra", {}).get("bundled", {})
    if bundled.get("recipe_version") != RECIPE_VERSION:
        return False
    if bundled.get("vocab_size") != vocab_size:
        raise DataError(f"{path}: holds the bundled dataset with vocab_size {bundled.get('vocab_size')}, "
                        f"not {vocab_size}; use another cache_dir")
    return True


def build_bundled_dataset(out_dir: str | os.PathLike, vocab_size: int = 4096, *,
                          num_proc: int | None = None, progress: bool = False) -> dict:
    """Build corpus (``out_dir/corpus``), tokenizer and shards into ``out_dir``; returns meta.
    ``num_proc``: threads for training the tokenizer."""
    out_dir = Path(out_dir)
    corpus = write_corpus(out_dir / "corpus")
    source = Source(files={"train": str(out_dir / "corpus" / "train.txt"),
                           "validation": str(out_dir / "corpus" / "val.txt")},
                    doc_separator=DOC_SEPARATOR)
    tokenizer = train_tokenizer_from_source(source, out_dir / TOKENIZER_NAME, vocab_size=vocab_size,
                                            num_threads=num_proc)
    extra = {"bundled": {"recipe_version": RECIPE_VERSION, "vocab_size": vocab_size,
                         "corpus_sha256": corpus["sha256"], "package": corpus["package"],
                         "package_version": corpus["package_version"]}}
    # One process: the corpus is two units (train, validation), and worker processes would be
    # spawned from whatever program asked for the data (the trainer, under torchrun).
    return prepare_dataset(source, tokenizer, out_dir, num_proc=1, progress=progress, extra_meta=extra)


def ensure_bundled_dataset(cache_dir: str | os.PathLike | None = None, vocab_size: int = 4096, *,
                           num_proc: int | None = None, progress: bool = False) -> Path:
    """Return a prepared directory of the bundled corpus, building it first if needed.

    The result is a normal prepared dataset (``meta.json``, ``tokenizer.model``, ``train_*.bin``,
    ``validation_*.bin``) plus ``corpus/`` with the text and its license NOTICE. Takes a few
    seconds on 2 cores the first time, milliseconds afterwards.
    """
    final = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(vocab_size)
    if _is_complete(final, vocab_size):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = final.with_name(f".{final.name}.tmp-{tag}")
    try:
        build_bundled_dataset(tmp, vocab_size, num_proc=num_proc, progress=progress)
        if final.exists() and not _is_complete(final, vocab_size):
            # A stale or broken cache (older recipe, interrupted copy): move it aside atomically,
            # then delete it. If another process already did so, the rename simply fails.
            trash = final.with_name(f".{final.name}.stale-{tag}")
            try:
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            except OSError:
                pass
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final, vocab_size):  # lost the race to a broken dir: say so
                raise DataError(f"{final}: exists but is not a complete bundled dataset; remove it") from None
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op when the rename succeeded
