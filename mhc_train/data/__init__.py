"""Data pipeline: bundled corpus, lossless tokenizers, packed token shards, resumable loaders.

Typical use::

    from mhc_train.data import ensure_bundled_dataset, PackedLoader, ValidationLoader, check_vocab

    path = ensure_bundled_dataset(vocab_size=4096)          # cached under ~/.cache/mhc-train
    check_vocab(path, model_vocab_size)                      # DataError if ids would not fit
    train = PackedLoader(path, seq_len=512, batch_size=8, seed=0, rank=rank, world_size=world)
    inputs, targets = next(train)                            # int64 [8, 512] each
    val = ValidationLoader(path, seq_len=512, batch_size=8, max_batches=20, rank=rank, world_size=world)

Names are imported on first use: the preparation's worker processes import this package without
paying for torch (which only the loaders need).
"""

import importlib

_WHERE = {
    "build_bundled_dataset": "bundled", "default_cache_dir": "bundled", "ensure_bundled_dataset": "bundled",
    "DataError": "errors",
    "HFTokenizer": "hf_tokenizer", "train_bpe_json": "hf_tokenizer",
    "PackedLoader": "loader", "PackedTokens": "loader", "ValidationLoader": "loader", "segment_ids": "loader",
    "check_token_ids": "meta", "check_tokenizer": "meta", "check_vocab": "meta", "read_meta": "meta",
    "shard_files": "meta", "token_dtype": "meta", "verify_prepared": "meta",
    "DEFAULT_UNIT_BYTES": "prepare", "make_plan": "prepare", "merge_parts": "prepare", "prepare_dataset": "prepare",
    "Source": "sources",
    "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
    "train_tokenizer_from_source": "tokenizer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
