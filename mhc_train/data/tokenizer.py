"""A lossless SentencePiece tokenizer: ``decode(encode(text)) == text`` for any Unicode text.

SentencePiece is lossy by default (NFKC normalisation, collapsing runs of spaces, a dummy leading
space, ``<unk>`` for unseen characters). We train with the settings that turn all of that off:

* ``normalization_rule_name="identity"``, ``remove_extra_whitespaces=False``: text is kept verbatim.
* ``add_dummy_prefix=False``: no invented leading space (which decode would have to guess about).
* ``byte_fallback=True``: anything not in the vocabulary - "\\n", "\\t", emoji, rare scripts - is
  spelled as UTF-8 byte pieces ``<0x..>`` instead of ``<unk>``. Training reads text line by line,
  so "\\n" never enters the learned vocabulary; it is always the single byte piece ``<0x0A>``.
* ``split_digits=True``: numbers are spelled digit by digit (better arithmetic, no number pieces).
* ``allow_whitespace_only_pieces=True``: runs of spaces (indentation) can become single pieces.

One hole remains: SentencePiece writes spaces as the meta symbol U+2581 "▁" and turns every "▁" back
into a space on decode, so a *literal* "▁" in the input would come back as " ". ``Tokenizer.encode``
closes it by spelling literal "▁" as its three byte pieces, which decode verbatim.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterable, Sequence

from . import atomic
from .errors import DataError

META_SYMBOL = "\u2581"  # "▁", SentencePiece's stand-in for a space
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
MIN_VOCAB = 256 + 3 + 1  # 256 byte pieces + unk/bos/eos + at least one learned piece


class Tokenizer:
    """Thin wrapper over a SentencePiece model file, plus its sha256 (recorded in prepared data so a
    model is never trained or evaluated with token ids from a different tokenizer)."""

    kind = "sentencepiece"
    file_name = "tokenizer.model"  # its name in a prepared directory

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(model_path)
        try:
            proto = self.path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{self.path}: tokenizer model not found") from None
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as e:
            raise DataError(f"{self.path}: not a SentencePiece model ({e})") from None
        self.sha256 = hashlib.sha256(proto).hexdigest()
        # Byte pieces for a literal "▁"; None if the model has no byte fallback (then "▁" is lossy).
        ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in META_SYMBOL.encode("utf-8")]
        self._meta_ids = ids if all(self._sp.id_to_piece(i) != "<unk>" for i in ids) else None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str) -> list[int]:
        if META_SYMBOL not in text or self._meta_ids is None:
            return self._sp.encode(text)
        # Rare path: encode the pieces between literal "▁"s and splice in the byte pieces.
        parts = text.split(META_SYMBOL)
        ids = self._sp.encode(parts[0])
        for part in parts[1:]:
            ids += self._meta_ids
            ids += self._sp.encode(part)
        return ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts; SentencePiece's batched call avoids per-text Python overhead.
        ``num_threads`` None: SentencePiece's default (every core); the preparation passes 1."""
        if any(META_SYMBOL in t for t in texts):
            return [self.encode(t) for t in texts]
        return self._sp.encode(list(texts), num_threads=-1 if num_threads is None else num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of ``encode``; also accepts numpy arrays and torch tensors."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def save_to(self, out_dir: Path) -> str:
        """Copy the model into ``out_dir`` (a prepared directory); returns its file name."""
        atomic.write_bytes(out_dir / self.file_name, self.path.read_bytes())
        return self.file_name

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


def load_tokenizer(path: str | os.PathLike, eos_token: str | None = None):
    """A SentencePiece ``.model`` (or a directory holding only ``tokenizer.model``, e.g. a prepared
    one) -> ``Tokenizer``; a ``tokenizer.json``, or a directory with one (or loadable by
    ``AutoTokenizer``) -> ``HFTokenizer``. ``eos_token`` names the end-of-document token of a
    Hugging Face tokenizer (SentencePiece models have theirs built in)."""
    from .hf_tokenizer import CONFIG_NAME, JSON_NAME, HFTokenizer

    if isinstance(path, (Tokenizer, HFTokenizer)):
        return path
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: tokenizer not found")
    hf_files = p.is_dir() and ((p / JSON_NAME).is_file() or (p / CONFIG_NAME).is_file())
    if p.is_dir() and not hf_files and (p / Tokenizer.file_name).is_file():
        p = p / Tokenizer.file_name
    if p.is_file() and p.suffix != ".json":
        if eos_token is not None:
            raise DataError(f"{p}: eos_token applies to Hugging Face tokenizers only (a SentencePiece "
                            "model has its own EOS)")
        return Tokenizer(p)
    if p.is_dir() and not hf_files:
        raise DataError(f"{p}: directory has no tokenizer.json, tokenizer_config.json or tokenizer.model")
    return HFTokenizer(p, eos_token=eos_token)


def _lines(texts: Iterable[str]) -> Iterable[str]:
    # SentencePiece trains on "sentences"; lines are the natural unit and "\n" is byte fallback.
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(
    texts: Iterable[str],
    model_path: str | os.PathLike,
    *,
    vocab_size: int = 4096,
    model_type: str = "bpe",
    input_sentence_size: int = 2_000_000,
    num_threads: int | None = None,
    character_coverage: float = 0.9995,
    seed: int = 0,
) -> Tokenizer:
    """Train a lossless SentencePiece model on ``texts`` and write it atomically to ``model_path``.

    ``input_sentence_size`` lines are reservoir-sampled from the stream, which bounds training time
    and memory on large corpora (the stream itself is still read to the end). BPE trains in about a
    second on the 5 MB bundled corpus; ``unigram`` is ~10x slower to train but encodes faster.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise DataError(f"model_type={model_type!r}; expected 'bpe' or 'unigram'")
    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab_size={vocab_size} too small: byte fallback needs at least {MIN_VOCAB}")
    lines = _lines(texts)
    try:
        first = next(lines)
    except StopIteration:
        raise DataError(f"no text to train the tokenizer on (for {model_path})") from None

    def stream():
        yield first
        yield from lines

    spm.set_random_generator_seed(seed)  # sentence sampling is random; make it reproducible
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=stream(),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,  # bytes; longer lines are skipped, not truncated
            num_threads=num_threads or min(8, os.cpu_count() or 1),
            minloglevel=2,  # training chatter goes to stderr otherwise
        )
    except RuntimeError as e:  # e.g. "Vocabulary size too high" for a tiny corpus
        raise DataError(f"sentencepiece training for {model_path} failed: {str(e).strip()[:300]}") from None
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(model_path, buf.getvalue())
    return Tokenizer(model_path)


def train_tokenizer_from_source(source, model_path: str | os.PathLike, *, split: str = "train",
                                max_documents: int | None = None, **kwargs) -> Tokenizer:
    """Train on one split of a ``Source`` (see ``sources.py``), streamed; ``kwargs`` go to
    ``train_tokenizer``. ``max_documents`` caps how much of a huge source is read (from its start)."""
    from .units import source_documents

    return train_tokenizer(source_documents(source, split, max_documents), model_path, **kwargs)
