"""A source cut into work units, and the streaming of one unit's documents.

A unit is a list of pieces ``[file, start, end]`` of one split, about ``unit_bytes`` of input:

* text and JSON-lines files are cut into byte ranges. A range owns the records that *start* in it
  (the first after the previous delimiter), so ranges need no scan to be cut and every record is
  read exactly once. This needs a delimiter that cannot overlap itself ("\\n", "\\f\\n"; not
  "\\n\\n"), else the file is one piece;
* Parquet files are cut between row groups;
* a hub dataset (``datasets`` streaming, no Arrow cache) is cut into its own shards;
* small files are grouped until a unit holds ``unit_bytes``.

The cut depends on the inputs (names, sizes, a hash of each file's head and tail) and
``unit_bytes`` only, never on how many processes or machines run it: each unit's shards are then
the same however the work is spread, and whenever it is resumed.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError
from .sources import Source, file_format, resolve_files

SAMPLE_BYTES = 1 << 12  # head and tail bytes hashed into a file's fingerprint (cheap on 10^4 files)


def _short(e: BaseException, limit: int = 300) -> str:
    """One line about the root cause: ``datasets`` wraps parse errors in a generic
    DatasetGenerationError whose message says nothing about what is wrong."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) <= limit else msg[:limit] + "..."


def borderless(delimiter: str) -> bool:
    """True if no proper prefix of ``delimiter`` is also a suffix: its occurrences cannot overlap,
    so they are the same wherever a scan starts."""
    return not any(delimiter[:k] == delimiter[-k:] for k in range(1, len(delimiter)))


def _delimiter(source: Source, fmt: str) -> str | None:
    """Where a file of this format may be cut (None: it is read whole)."""
    if fmt == "json":
        return "\n"
    if fmt != "text":
        return None
    if source.text_sample_by == "line":
        return "\n"
    sep = source.doc_separator
    if source.text_sample_by == "document" and sep and borderless(sep):
        return sep  # records are then documents already
    return None


def _fingerprint(path: Path, size: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        f.seek(max(0, size - SAMPLE_BYTES))
        h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:32]


def _first_line(path: Path, limit: int = 1 << 24) -> bytes:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                return line[:limit]
            if f.tell() > limit:
                break
    return b""


def _check_json_field(path: Path, text_field: str) -> str:
    """``json_array`` or ``delimited``, after checking the first record has ``text_field``."""
    head = _first_line(path)
    if head.lstrip().startswith(b"["):
        return "json_array"
    try:
        record = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: first line is not JSON ({e})") from None
    if not isinstance(record, dict) or text_field not in record:
        columns = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{path}: no column {text_field!r} (columns: {columns})")
    return "delimited"


def _cuts(path: Path, fmt: str, delimiter: str | None, text_field: str,
          unit_bytes: int) -> tuple[str, list[tuple[int, int, int]]]:
    """(reader, [(start, end, input bytes)]) for one non-empty file."""
    size = path.stat().st_size
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path)
        except Exception as e:
            raise DataError(f"{path}: not a Parquet file ({_short(e)})") from None
        if text_field not in meta.schema_arrow.names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {meta.schema_arrow.names})")
        cuts, first, nbytes = [], 0, 0
        for g in range(meta.num_row_groups):
            gbytes = meta.metadata.row_group(g).total_byte_size
            if g > first and nbytes + gbytes > unit_bytes:
                cuts.append((first, g, nbytes))
                first, nbytes = g, 0
            nbytes += gbytes
        if meta.num_row_groups:
            cuts.append((first, meta.num_row_groups, nbytes))
        return "parquet", cuts
    reader = "whole"
    if fmt == "json":
        reader = _check_json_field(path, text_field)
    elif delimiter is not None:
        reader = "delimited"
    if reader != "delimited":
        return reader, [(0, size, size)]
    return reader, [(a, min(a + unit_bytes, size), min(unit_bytes, size - a)) for a in range(0, size, unit_bytes)]


def _group(pieces: list[tuple[int, int, int, int]], unit_bytes: int) -> list[list[list[int]]]:
    """Consecutive pieces (file, start, end, bytes) into units of about ``unit_bytes``."""
    units: list[list[list[int]]] = []
    current: list[list[int]] = []
    nbytes = 0
    for f, a, b, n in pieces:
        if current and nbytes + n > unit_bytes:
            units.append(current)
            current, nbytes = [], 0
        current.append([f, a, b])
        nbytes += n
    if current:
        units.append(current)
    return units


def plan_split(source: Source, split: str, unit_bytes: int) -> dict[str, Any]:
    """The units of one split, and what they were cut from. Raises DataError for a missing path,
    an unknown or mixed format, a missing column or a source without bytes."""
    if unit_bytes < 1:
        raise DataError(f"unit_bytes={unit_bytes} must be positive")
    if source.hub_name:
        return _plan_hub(source, split)
    paths = resolve_files(source.files[split])
    where = str(paths[0]) if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more files)"
    fmt = file_format(paths)
    paths = [p for p in paths if p.stat().st_size > 0]  # zero-byte files hold no documents
    if not paths:
        raise DataError(f"{where}: dataset is empty (0 bytes)")
    root = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    delimiter = _delimiter(source, fmt)
    files, pieces = [], []
    for i, p in enumerate(paths):
        reader, cuts = _cuts(p, fmt, delimiter, source.text_field, unit_bytes)
        size = p.stat().st_size
        files.append({"path": str(p.resolve()), "name": str(p.resolve().relative_to(root)), "size": size,
                      "reader": reader, "fingerprint": _fingerprint(p, size)})
        pieces += [(i, a, b, n) for a, b, n in cuts]
    if not pieces:
        raise DataError(f"{where}: dataset is empty (no rows)")
    return {"where": where, "format": fmt, "delimiter": delimiter, "files": files,
            "units": _group(pieces, unit_bytes)}


def _hub_dataset(source: Source, name: str):
    """The hub split ``name``, streamed: no download of the whole dataset, no Arrow cache."""
    import datasets

    try:
        return datasets.load_dataset(source.hub_name, source.hub_config, split=name, streaming=True)
    except Exception as e:  # network, auth, missing split...: one short message, cause chained
        raise DataError(f"{source.hub_name}[{name}]: could not load hub dataset ({_short(e)})") from e


def hub_splits(source: Source) -> list[str]:
    """Our splits that the hub dataset has (a FineWeb-style dataset has only train)."""
    import datasets

    try:
        names = set(datasets.get_dataset_split_names(source.hub_name, source.hub_config))
    except Exception as e:
        raise DataError(f"{source.hub_name}: could not list the hub dataset's splits ({_short(e)})") from e
    return [s for s in source.splits() if source.hub_splits[s] in names]


def _plan_hub(source: Source, split: str) -> dict[str, Any]:
    ds = _hub_dataset(source, source.hub_splits[split])
    where = f"{source.hub_name}[{source.hub_splits[split]}]"
    if ds.column_names is not None and source.text_field not in ds.column_names:
        raise DataError(f"{where}: no column {source.text_field!r} (columns: {ds.column_names})")
    n = ds.num_shards
    return {"where": where, "format": "hub", "delimiter": None, "files": [],
            "hub": {"name": source.hub_name, "config": source.hub_config, "split": source.hub_splits[split],
                    "num_shards": n},
            "units": [[[0, i, i + 1]] for i in range(n)]}


# ----------------------------------------------------------------------------- reading


def _decode(data: bytes, path: str, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte offset {offset + e.start}") from None


def _delimited(path: str, delimiter: bytes, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of the records that start in [start, end): the first record starts at 0 or
    right after a delimiter."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        d = len(delimiter)
        s = start
        if start > 0:
            p = mm.find(delimiter, max(0, start - d))
            if p < 0:
                return
            s = p + d
        while s < end:
            p = mm.find(delimiter, s)
            yield s, mm[s:p if p >= 0 else len(mm)]
            if p < 0:
                return
            s = p + d


def _field(record: Any, text_field: str, where: str) -> str | None:
    if not isinstance(record, dict) or text_field not in record:
        raise DataError(f"{where}: no column {text_field!r} in a record")
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: column {text_field!r} holds {type(text).__name__}, not text")
    return text


def _records(source: Source, split_plan: dict, piece: list[int]) -> Iterator[str | None]:
    """The texts of one piece, in file order."""
    f, start, end = piece
    fmt, field = split_plan["format"], source.text_field
    if fmt == "hub":
        ds = _hub_dataset(source, split_plan["hub"]["split"])
        for record in ds.shard(num_shards=split_plan["hub"]["num_shards"], index=start):
            yield _field(record, field, split_plan["where"])
        return
    entry = split_plan["files"][f]
    path, reader = entry["path"], entry["reader"]
    if reader == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, row_groups=range(start, end), columns=[field]):
            yield from batch.column(0).to_pylist()
    elif reader == "json_array":
        with open(path, "rb") as fh:
            try:
                records = json.load(fh)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}: not valid JSON ({e})") from None
        for record in records if isinstance(records, list) else [records]:
            yield _field(record, field, path)
    elif reader == "whole":
        with open(path, "rb") as fh:
            text = _decode(fh.read(), path, 0)
        yield from (text.split("\n\n") if source.text_sample_by == "paragraph" else (text,))
    elif fmt == "json":
        for offset, line in _delimited(path, b"\n", start, end):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: invalid UTF-8 at byte offset {offset + e.start}") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON in the line at byte offset {offset} ({e})") from None
            yield _field(record, field, f"{path} (line at byte offset {offset})")
    else:
        for offset, data in _delimited(path, split_plan["delimiter"].encode("utf-8"), start, end):
            yield _decode(data, path, offset)


def unit_documents(source: Source, split_plan: dict, unit: list[list[int]]) -> Iterator[str]:
    """The non-empty documents of one unit: each record split at ``doc_separator``."""
    sep = source.doc_separator
    for piece in unit:
        for text in _records(source, split_plan, piece):
            if text:
                yield from (d for d in text.split(sep) if d) if sep else (text,)


def source_documents(source: Source, split: str = "train", limit: int | None = None) -> Iterator[str]:
    """Every document of a split in order (at most ``limit``), streamed: what tokenizers train on."""
    split_plan = plan_split(source, split, unit_bytes=1 << 62)
    n = 0
    for unit in split_plan["units"]:
        for doc in unit_documents(source, split_plan, unit):
            if limit is not None and n >= limit:
                return
            n += 1
            yield doc
