"""Where documents come from: local text / json / parquet files, or a Hugging Face hub dataset.

``Source`` only describes; ``units.py`` cuts a source into work units and streams their documents.
The checks that need no reading of the data (missing path, unknown format, empty files, missing
column) run when the units are planned, before anything is written; undecodable bytes and broken
JSON are found while streaming, with the file and byte offset in the message.
"""

from __future__ import annotations

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
        line breaks stay part of the text), "paragraph" (split at "\\n\\n") or "line" (split at "\\n";
        a "\\r" before it stays in the text).
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
