"""Where documents come from: local text / json / parquet files, or a Hugging Face hub dataset.

Everything is loaded through ``datasets`` so large sources are memory-mapped Arrow tables that can be
tokenized in parallel with ``Dataset.map``. All input checks that can fail (missing path, unknown
format, undecodable bytes, missing column, empty dataset) run here, *before* anything is written, so a
bad source never leaves a half-prepared output behind.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import DataError

SPLITS = ("train", "validation")
TEXT_EXTS = {".txt", ".text", ".md"}
JSON_EXTS = {".json", ".jsonl"}
PARQUET_EXTS = {".parquet"}
_FORMATS = {**{e: "text" for e in TEXT_EXTS}, **{e: "json" for e in JSON_EXTS},
            **{e: "parquet" for e in PARQUET_EXTS}}


@dataclass(frozen=True)
class Source:
    """A document source. Either local ``files`` per split or a hub dataset ``hub_name``.

    files: split name ("train" / "validation") -> files, directories or glob patterns. All files of a
        split must have one format, chosen by extension (.txt/.text/.md, .json/.jsonl, .parquet).
    text_field: column holding the text in json / parquet / hub data.
    text_sample_by: for text files, what one record is: "document" (a whole file, the default, so
        line breaks stay part of the text), "paragraph" or "line" (as in ``datasets``' text loader).
    doc_separator: optional string that further splits each record into documents (the bundled
        corpus separates plays with a form feed line); every document gets an EOS after it.
    hub_name / hub_config / hub_splits: a hub dataset, its config, and our split -> its split name.
    """

    files: dict[str, tuple[str, ...]] = field(default_factory=dict)
    text_field: str = "text"
    text_sample_by: str = "document"
    doc_separator: str | None = None
    hub_name: str | None = None
    hub_config: str | None = None
    hub_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "validation": "validation"})

    def __post_init__(self):
        if (self.hub_name is None) == (not self.files):
            raise DataError("a Source needs exactly one of: files per split, or hub_name")
        bad = sorted(set(self.files) - set(SPLITS))
        if bad:
            raise DataError(f"unknown split names {bad}; expected {list(SPLITS)}")
        if self.text_sample_by not in ("document", "paragraph", "line"):
            raise DataError(f"text_sample_by={self.text_sample_by!r}; expected document, paragraph or line")
        if self.doc_separator == "":
            raise DataError("doc_separator must be a non-empty string or None")
        # Tuples of str, whatever the caller passed (a str, Paths, a list): one canonical form.
        object.__setattr__(self, "files", {k: (str(v),) if isinstance(v, (str, os.PathLike)) else tuple(map(str, v))
                                           for k, v in self.files.items()})

    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in (self.hub_splits if self.hub_name else self.files)]

    def describe(self) -> dict:
        """JSON-serialisable description, stored in meta.json so a prepared dir names its origin."""
        d = asdict(self)
        d["files"] = {k: list(v) for k, v in self.files.items()}
        return d


def resolve_files(patterns: tuple[str, ...]) -> list[Path]:
    """Expand directories (their files with a known extension, recursively) and globs, in sorted
    order so the document order - and hence the shards - is reproducible."""
    out: list[Path] = []
    for pat in patterns:
        p = Path(pat).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _FORMATS)
            if not found:
                raise DataError(f"{p}: directory has no .txt/.json/.jsonl/.parquet files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        elif glob.has_magic(pat):
            found = sorted(Path(f) for f in glob.glob(os.path.expanduser(pat), recursive=True))
            if not found:
                raise DataError(f"{pat}: glob matches no files")
            out.extend(found)
        else:
            raise DataError(f"{p}: no such file or directory")
    return out


def file_format(files: list[Path]) -> str:
    fmts = {_FORMATS.get(f.suffix.lower()) for f in files}
    if None in fmts:
        bad = next(f for f in files if f.suffix.lower() not in _FORMATS)
        raise DataError(f"{bad}: unknown file type (expected {sorted(_FORMATS)})")
    if len(fmts) != 1:
        raise DataError(f"files of one split mix formats {sorted(fmts)}: {[str(f) for f in files]}")
    return fmts.pop()


def check_utf8(path: Path, chunk_size: int = 1 << 20) -> None:
    """Raise DataError naming the file and byte offset of the first invalid UTF-8 sequence.

    ``datasets`` would fail too, but with a traceback from deep inside a builder and no offset.
    An incremental decoder keeps memory flat and handles sequences split across chunks.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            final = not chunk
            try:
                decoder.decode(chunk, final=final)
            except UnicodeDecodeError as e:
                # e.start is relative to (bytes still buffered in the decoder) + chunk.
                pending = len(e.object) - len(chunk)
                raise DataError(f"{path}: invalid UTF-8 at byte offset {offset - pending + e.start}") from None
            if final:
                return
            offset += len(chunk)


def _short(e: BaseException, limit: int = 300) -> str:
    """One line about the root cause: ``datasets`` wraps parse errors in a generic
    DatasetGenerationError whose message says nothing about what is wrong."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) <= limit else msg[:limit] + "..."


def load_split(source: Source, split: str, cache_dir: str | os.PathLike | None = None):
    """Load one split: ``(dataset, where)``, a ``datasets.Dataset`` with a single ``text`` column
    and a short description of where it came from (for messages and meta.json).

    ``cache_dir`` receives ``datasets``' Arrow cache for local files; callers pass a temporary
    directory so repeated preparations do not fill ``~/.cache/huggingface`` with copies.
    """
    import datasets

    if source.hub_name:
        where = f"{source.hub_name}[{source.hub_splits[split]}]"
        try:
            ds = datasets.load_dataset(source.hub_name, source.hub_config, split=source.hub_splits[split])
        except Exception as e:  # network, auth, missing split...: one short message, cause chained
            raise DataError(f"{where}: could not load hub dataset ({_short(e)})") from e
    else:
        files = resolve_files(source.files[split])
        where = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more files)"
        fmt = file_format(files)
        # Zero-byte files hold no documents, and the json loader chokes on them with a bare
        # StopIteration; drop them, and call a split made only of them what it is.
        files = [f for f in files if f.stat().st_size > 0]
        if not files:
            raise DataError(f"{where}: dataset is empty (0 bytes)")
        kwargs = {}
        if fmt == "text":
            for f in files:
                check_utf8(f)
            kwargs["sample_by"] = source.text_sample_by
        try:
            ds = datasets.load_dataset(
                fmt, data_files={"data": [str(f) for f in files]}, split="data",
                cache_dir=None if cache_dir is None else str(cache_dir), **kwargs,
            )
        except Exception as e:
            raise DataError(f"{where}: could not load as {fmt} ({_short(e)})") from e
    if source.text_field not in ds.column_names:
        raise DataError(f"{where}: no column {source.text_field!r} (columns: {ds.column_names})")
    ds = ds.select_columns([source.text_field])
    if source.text_field != "text":
        ds = ds.rename_column(source.text_field, "text")
    if len(ds) == 0:
        raise DataError(f"{where}: dataset is empty")
    return ds, str(where)


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Silence ``datasets``' own bars (loading, map) when the caller wants no progress output."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if not enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            datasets.enable_progress_bars()
