"""Hugging Face tokenizers (``tokenizer.json``, or a local ``AutoTokenizer`` directory) with the
interface of ``Tokenizer``: the DeepSeek-V3 tokenizer (129,280 ids) is the reference case.

Choices, each for losslessness or for clean document boundaries:

* Encoding adds no special tokens (no BOS from a post-processor): documents are separated by the
  EOS id the preparation appends, nothing else.
* ``encode_special_tokens = True``: a special token's *text* inside a document ("<|endoftext|>",
  "<｜end▁of▁sentence｜>") is encoded as ordinary text, so a document can never fake a boundary,
  and decoding gives the text back.
* Decoding keeps special tokens. With a byte-level BPE and no normaliser (GPT-2 style, DeepSeek-V3)
  ``decode(encode(text)) == text`` for any text; a tokenizer.json with a normaliser (NFKC, lower
  case) is not lossless, and the preparation records whether a sample round-trips.
* Encoding is single-threaded: the preparation parallelises over processes, one core each.

The EOS id comes from ``eos_token`` if given, else ``tokenizer_config.json`` beside the file, else
the first of ``KNOWN_EOS`` in the vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from . import atomic
from .errors import DataError

JSON_NAME = "tokenizer.json"
CONFIG_NAME = "tokenizer_config.json"
KNOWN_EOS = ("<｜end▁of▁sentence｜>", "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def _special(config: dict, key: str) -> str | None:
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def _auto_tokenizer_json(directory: Path) -> str:
    """The fast-tokenizer JSON of a directory ``AutoTokenizer`` can load (a slow tokenizer is
    converted); local files only, no remote code."""
    try:
        from transformers import AutoTokenizer

        auto = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:
        raise DataError(f"{directory}: AutoTokenizer could not load it ({type(e).__name__}: {str(e)[:200]})") from None
    backend = getattr(auto, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"{directory}: AutoTokenizer gave a slow tokenizer without a tokenizer.json; "
                        "save a fast one with AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
    return backend.to_str()


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` (a file, or a directory holding one or
    loadable by ``AutoTokenizer``), plus the sha256 of that JSON."""

    kind = "huggingface"
    file_name = JSON_NAME

    def __init__(self, path: str | os.PathLike, eos_token: str | None = None):
        import tokenizers

        self.path = Path(path)
        if self.path.is_dir():
            config_dir = self.path
            if (self.path / JSON_NAME).is_file():
                self.json_bytes = (self.path / JSON_NAME).read_bytes()
            else:
                self.json_bytes = _auto_tokenizer_json(self.path).encode("utf-8")
        elif self.path.is_file():
            config_dir = self.path.parent
            self.json_bytes = self.path.read_bytes()
        else:
            raise DataError(f"{self.path}: tokenizer not found")
        try:
            self._tok = tokenizers.Tokenizer.from_str(self.json_bytes.decode("utf-8"))
        except Exception as e:
            raise DataError(f"{self.path}: not a tokenizer.json ({str(e)[:200]})") from None
        self._tok.encode_special_tokens = True
        self.sha256 = hashlib.sha256(self.json_bytes).hexdigest()
        config_file = config_dir / CONFIG_NAME
        self.config_bytes = config_file.read_bytes() if config_file.is_file() else None
        config = json.loads(self.config_bytes) if self.config_bytes else {}
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1
        self.eos_token = eos_token or _special(config, "eos_token") or next((t for t in KNOWN_EOS if t in vocab), None)
        if self.eos_token is None or self.eos_token not in vocab:
            what = f"eos_token {self.eos_token!r} is not in its vocabulary" if self.eos_token else \
                f"no end-of-document token (no eos_token in {CONFIG_NAME}, none of {list(KNOWN_EOS)})"
            raise DataError(f"{self.path}: {what}; name one with --eos-token (eos_token=...)")
        self._eos_id = vocab[self.eos_token]
        bos = _special(config, "bos_token")
        self._bos_id = vocab.get(bos) if bos else None

    @property
    def vocab_size(self) -> int:
        """Largest id + 1 (added tokens included): what an embedding must hold."""
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """One after the other: as fast as ``encode_batch`` per core on long documents, and it keeps
        one process on one core (``num_threads`` is accepted for the common interface)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def save_to(self, out_dir: Path) -> str:
        """Write ``tokenizer.json`` (and the config, for ``AutoTokenizer``) into ``out_dir``."""
        atomic.write_bytes(out_dir / JSON_NAME, self.json_bytes)
        if self.config_bytes is not None:
            atomic.write_bytes(out_dir / CONFIG_NAME, self.config_bytes)
        return JSON_NAME

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


def train_bpe_json(texts: Iterable[str], path: str | os.PathLike, *, vocab_size: int = 8192,
                   eos_token: str = "<|endoftext|>") -> HFTokenizer:
    """Train a GPT-2-style byte-level BPE (lossless, no normaliser) and write it as ``tokenizer.json``."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + 1 + 1:
        raise DataError(f"vocab_size={vocab_size} too small: a byte-level BPE needs at least 258")
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() <= 256 + 1:
        raise DataError(f"no text to train the tokenizer on (for {path})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, tok.to_str())
    return HFTokenizer(path, eos_token=eos_token)
