"""Data pipeline: bundled corpus, lossless tokenizer, packed token shards, resumable loaders.

Typical use::

    from mhc_train.data import ensure_bundled_dataset, PackedLoader, ValidationLoader, check_vocab

    path = ensure_bundled_dataset(vocab_size=4096)          # cached under ~/.cache/mhc-train
    check_vocab(path, model_vocab_size)                      # DataError if ids would not fit
    train = PackedLoader(path, seq_len=512, batch_size=8, seed=0, rank=rank, world_size=world)
    inputs, targets = next(train)                            # int64 [8, 512] each
    val = ValidationLoader(path, seq_len=512, batch_size=8, max_batches=20, rank=rank, world_size=world)
"""

from .bundled import build_bundled_dataset, default_cache_dir, ensure_bundled_dataset
from .errors import DataError
from .loader import PackedLoader, PackedTokens, ValidationLoader
from .meta import check_tokenizer, check_vocab, read_meta, shard_files, token_dtype
from .prepare import prepare_dataset
from .sources import Source, load_split
from .tokenizer import Tokenizer, train_tokenizer, train_tokenizer_from_source

__all__ = [
    "DataError",
    "PackedLoader", "PackedTokens", "Source", "Tokenizer", "ValidationLoader",
    "build_bundled_dataset", "check_tokenizer", "check_vocab", "default_cache_dir",
    "ensure_bundled_dataset", "load_split", "prepare_dataset", "read_meta", "shard_files", "token_dtype",
    "train_tokenizer", "train_tokenizer_from_source",
]
