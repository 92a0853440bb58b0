"""Data preparation at scale: streaming units, worker processes, kill -9 and resume, parts, carved
validation, Hugging Face tokenizer.json, token ids beyond the vocabulary, the recipes' CLI.

The reference for every layout of the work (2 processes, killed and resumed, parts in one or two
directories) is one uninterrupted single-process run: the shards must be byte-identical.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mhc_train.data import (
    DataError, PackedLoader, Source, check_token_ids, check_vocab, load_tokenizer, merge_parts, prepare_dataset,
    read_meta, shard_files, train_bpe_json, verify_prepared,
)
from mhc_train.data import loader as loader_mod
from mhc_train.data.progress import part_lock
from mhc_train.data.shakespeare import DOC_SEPARATOR
from mhc_train.data.units import plan_split, source_documents, unit_documents
from test_data import TRICKY, VOCAB, _split_docs, corpus, make_docs, prepared, tok  # noqa: F401  (fixtures too)

ROOT = Path(__file__).resolve().parents[1]
UNIT = 8_000  # bytes of input per unit: ~18 train units from the 139 kB corpus


def _bins(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.bin"))}


def _same_dataset(a: Path, b: Path) -> None:
    assert _bins(a) == _bins(b) and len(_bins(a)) > 10
    assert read_meta(a) == read_meta(b)


def _docs_of(d: Path, split: str, tokenizer) -> list[str]:
    meta = read_meta(d)
    flat = np.concatenate([np.fromfile(f, dtype=meta["dtype"]) for f, _ in shard_files(d, meta, split)])
    return [tokenizer.decode(x[:-1]) for x in _split_docs(flat, meta["tokenizer"]["eos_id"])]


@pytest.fixture(scope="module")
def whole(corpus, tok, tmp_path_factory) -> Path:  # noqa: F811
    """The reference: one process, no interruption."""
    out = tmp_path_factory.mktemp("whole") / "ds"
    prepare_dataset(corpus["source"], tok, out, unit_bytes=UNIT, num_proc=1, progress=False)
    return out


# ---------------------------------------------------------------- units


def test_units_read_every_document_once(tmp_path):
    """Cut into ranges of any size, files give back exactly the documents of a whole read."""
    rng = random.Random(0)
    docs = ["".join(rng.choice("ab é€😀\n\f") for _ in range(rng.randint(1, 30))) for _ in range(40)]
    text = tmp_path / "t.txt"
    text.write_text(DOC_SEPARATOR + DOC_SEPARATOR.join(docs) + DOC_SEPARATOR, encoding="utf-8")
    want = [d for d in text.read_text(encoding="utf-8").split(DOC_SEPARATOR) if d]
    lines = tmp_path / "l.jsonl"
    lines.write_text("\n".join(json.dumps({"text": d}) if i % 7 else "" for i, d in enumerate(docs)) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": docs}), tmp_path / "p.parquet", row_group_size=6)
    cases = [(Source(files={"train": str(text)}, doc_separator=DOC_SEPARATOR), want),
             (Source(files={"train": str(lines)}), [d for i, d in enumerate(docs) if i % 7]),
             (Source(files={"train": str(tmp_path / "p.parquet")}), docs)]
    for source, expected in cases:
        for unit_bytes in (1, 3, 7, 64, 1 << 20):
            plan = plan_split(source, "train", unit_bytes)
            got = [d for u in plan["units"] for d in unit_documents(source, plan, u)]
            assert got == expected, (source.files, unit_bytes)
    # A separator that overlaps itself cannot be cut at: the file is one piece, read whole.
    para = Source(files={"train": str(text)}, doc_separator="\n\n")
    assert len(plan_split(para, "train", 4)["units"]) == 1
    assert list(source_documents(para)) == [d for d in text.read_text(encoding="utf-8").split("\n\n") if d]


# ---------------------------------------------------------------- resume, parts


def test_kill_and_resume_is_byte_identical(corpus, tok, whole, tmp_path):  # noqa: F811
    """2 worker processes, SIGKILL after 4 units, resume: the shards of an uninterrupted run."""
    out = tmp_path / "ds"
    source = {"train": str(corpus["dir"] / "train.txt"), "validation": str(corpus["dir"] / "val.txt")}
    script = f"""
import os, signal
from mhc_train.data import Source, prepare_dataset
done = []
def kill_after(record):
    done.append(record)
    if len(done) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
if __name__ == "__main__":
    prepare_dataset(Source(files={source!r}, doc_separator={DOC_SEPARATOR!r}), {str(tok.path)!r}, {str(out)!r},
                    unit_bytes={UNIT}, num_proc=2, progress=False, on_unit_done=kill_after)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the workers die with their parent; make sure
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, err
    assert not (out / "meta.json").exists()
    killed_done = len(list((out / "progress" / "done").glob("*.json")))
    assert killed_done >= 4
    resumed = []
    meta = prepare_dataset(corpus["source"], tok, out, unit_bytes=UNIT, num_proc=2, progress=False,
                           on_unit_done=resumed.append)
    assert meta == read_meta(out) and len(resumed) == meta["preparation"]["units"] - killed_done
    _same_dataset(out, whole)
    assert not [p.name for p in out.rglob("*") if ".tmp-" in p.name]
    # Complete: running it again does nothing.
    assert prepare_dataset(corpus["source"], tok, out, unit_bytes=UNIT, progress=False,
                           on_unit_done=lambda r: pytest.fail("redone")) == meta


def test_parts_equal_the_whole(corpus, tok, whole, tmp_path):  # noqa: F811
    def part(i, d):
        return prepare_dataset(corpus["source"], tok, d, unit_bytes=UNIT, num_proc=1, part=(i, 2), progress=False)

    # Two machines, one shared directory: the last part to finish writes meta.json.
    shared = tmp_path / "shared"
    assert part(0, shared) is None and not (shared / "meta.json").exists()
    assert part(1, shared) == read_meta(shared)
    _same_dataset(shared, whole)
    # Two machines, two directories, then merged (checked: one plan, every unit).
    a, b = tmp_path / "a", tmp_path / "b"
    part(0, a), part(1, b)
    with pytest.raises(DataError, match=r"units missing \(train 1, train 3"):
        merge_parts(tmp_path / "half", [a])
    other = tmp_path / "other"
    prepare_dataset(corpus["source"], tok, other, unit_bytes=UNIT // 2, num_proc=1, part=(1, 2), progress=False)
    with pytest.raises(DataError, match="another plan.*unit_bytes"):
        merge_parts(tmp_path / "bad", [a, other])
    merge_parts(tmp_path / "merged", [a, b])
    _same_dataset(tmp_path / "merged", whole)
    merge_parts(a, [a, b])  # into one of the parts
    _same_dataset(a, whole)


def test_other_settings_refused_lock_and_overwrite(corpus, tok, whole, tmp_path):  # noqa: F811
    d = tmp_path / "ds"
    shutil.copytree(whole, d)
    with pytest.raises(DataError, match=r"holds a prepared dataset of other inputs or settings \(differs in: seed"):
        prepare_dataset(corpus["source"], tok, d, unit_bytes=UNIT, seed=1, progress=False)
    read_meta(d)  # untouched
    with part_lock(d, (0, 1)):  # another process is preparing this part
        with pytest.raises(DataError, match=r"part 0/1 is being prepared by pid \d+"):
            prepare_dataset(corpus["source"], tok, d, unit_bytes=UNIT, seed=1, overwrite=True, progress=False)
    read_meta(d)  # still untouched
    meta = prepare_dataset(corpus["source"], tok, d, unit_bytes=UNIT, seed=1, overwrite=True, num_proc=1,
                           progress=False)
    assert meta["preparation"]["seed"] == 1 and _bins(d) == _bins(whole)  # the seed only moves a carve-out
    assert load_tokenizer(d).sha256 == tok.sha256  # a prepared directory names its tokenizer


# ---------------------------------------------------------------- validation carved from train


def test_train_only_source_gets_a_validation_split(tok, tmp_path):  # noqa: F811
    docs = make_docs(90, seed=5)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):  # hub-style file names: datasets sees one train split of three shards
        with open(src / f"train-0000{i}-of-00003.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs[i * 30:(i + 1) * 30])
    for name, source in (("files", Source(files={"train": str(src)})),
                         ("hub", Source(hub_name=str(src)))):  # the hub path: datasets streaming, 3 shards
        out = tmp_path / name
        meta = prepare_dataset(source, tok, out, unit_bytes=20_000, val_fraction=0.1, num_proc=1, progress=False)
        train, val = _docs_of(out, "train", tok), _docs_of(out, "validation", tok)
        assert sorted(train + val) == sorted(docs) and 0 < len(val) < 0.2 * len(docs), name
        assert meta["splits"]["validation"]["source"].startswith("one document in 10 of ")
    with pytest.raises(DataError, match="val_fraction=1"):
        prepare_dataset(Source(files={"train": str(src)}), tok, tmp_path / "x", val_fraction=1, progress=False)


# ---------------------------------------------------------------- tokenizer.json


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):  # noqa: F811
    return train_bpe_json(corpus["train"], tmp_path_factory.mktemp("bpe") / "tokenizer.json", vocab_size=600)


def test_tokenizer_json_round_trip(bpe, corpus, tmp_path):  # noqa: F811
    rng = random.Random(1)
    pool = [chr(c) for c in (*range(0x20, 0x7F), *range(0xA0, 0x2FF), *range(0x4E00, 0x4E40), *range(0x1F600, 0x1F640))]
    texts = TRICKY + ["".join(rng.choice(pool + ["\n", "\t", "\r", "  "]) for _ in range(rng.randint(0, 60)))
                      for _ in range(100)]
    for text in texts:
        assert bpe.decode(bpe.encode(text)) == text, repr(text)
    # The EOS token's text inside a document is text, not a document boundary.
    assert bpe.eos_token == "<|endoftext|>" and bpe.eos_id not in bpe.encode("a <|endoftext|> b")
    assert bpe.decode(bpe.encode("a <|endoftext|> b")) == "a <|endoftext|> b"
    # A Hugging Face directory: the EOS comes from tokenizer_config.json.
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(bpe.path, hf / "tokenizer.json")
    config = {"eos_token": {"content": "<|endoftext|>"}, "bos_token": None}
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(hf)
    assert loaded.kind == "huggingface" and loaded.sha256 == bpe.sha256 and loaded.eos_id == bpe.eos_id
    with pytest.raises(DataError, match="eos_token 'nope' is not in its vocabulary; name one with --eos-token"):
        load_tokenizer(hf, eos_token="nope")
    # Prepared with it: the shards decode to the documents exactly.
    out = tmp_path / "ds"
    meta = prepare_dataset(corpus["source"], hf, out, unit_bytes=30_000, num_proc=2, progress=False)
    assert meta["tokenizer"]["kind"] == "huggingface" and meta["preparation"]["lossless_sample"]
    assert (out / "tokenizer.json").read_bytes() == bpe.path.read_bytes() and (out / "tokenizer_config.json").exists()
    assert _docs_of(out, "train", bpe) == corpus["train"] and _docs_of(out, "validation", bpe) == corpus["val"]
    assert load_tokenizer(out).sha256 == meta["tokenizer"]["sha256"]


# ---------------------------------------------------------------- ids beyond the vocabulary


def test_ids_beyond_the_vocabulary_name_the_file(prepared, tmp_path, monkeypatch):  # noqa: F811
    d = tmp_path / "d"
    shutil.copytree(prepared, d)
    meta = read_meta(d)
    # From the metadata: recorded at preparation, against the model's vocabulary.
    check_vocab(meta, VOCAB)
    with pytest.raises(DataError, match=r"token id \d+ \(meta.json max_token_id\) is beyond the model's vocab_size"):
        check_vocab(dict(meta, tokenizer=dict(meta["tokenizer"], vocab_size=8)), 8)
    # A damaged shard of the same size: the cheap scan when the data is opened names it.
    shard = d / "train_00002.bin"
    data = bytearray(shard.read_bytes())
    data[100:102] = (VOCAB + 5).to_bytes(2, "little")
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"train_00002\.bin: token id {VOCAB + 5} at token 50 is beyond the "
                                        r"vocabulary .*prepare it again"):
        PackedLoader(d, seq_len=16, batch_size=2)
    with pytest.raises(DataError, match=r"train_00002\.bin"):
        verify_prepared(d)
    # Where the scan does not reach, the batch that holds the id names it.
    monkeypatch.setattr(loader_mod, "check_token_ids", lambda *a, **k: None)
    loader = PackedLoader(d, seq_len=16, batch_size=2, shuffle=False)
    files = shard_files(d, meta, "train")
    first = sum((n - 1) // 16 for _, n in files[:2])
    with pytest.raises(DataError, match=rf"train_00002\.bin: token id {VOCAB + 5} at token 50 "):
        loader.data.gather(np.array([first + 3]))  # window 3 of that shard holds tokens 48..64
    # A scan with a small budget reads the ends of a large shard, the full scan everything.
    big = tmp_path / "big.bin"
    arr = np.zeros(1 << 20, dtype="<u2")
    arr[1 << 19] = 9
    arr.tofile(big)
    check_token_ids([(big, len(arr))], "uint16", 8, budget=1 << 15)
    with pytest.raises(DataError, match=f"token {1 << 19} "):
        check_token_ids([(big, len(arr))], "uint16", 8, budget=None)


# ---------------------------------------------------------------- the recipes' CLI


def test_data_recipes_cli(corpus, tok, whole, tmp_path):  # noqa: F811
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    top = subprocess.run([sys.executable, "-m", "data_recipes", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert top.returncode == 0
    assert all(f"  {r} " in top.stdout for r in ("corpus", "tokenizer", "prepare", "merge", "check"))
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "data_recipes", "prepare", "--train", str(corpus["dir"] / "train.txt"),
           "--validation", str(corpus["dir"] / "val.txt"), "--doc-separator", r"\f\n", "--tokenizer", str(tok.path),
           "--unit-mb", str(UNIT / 2**20), "--num-proc", "1", str(out)]
    for i in (0, 1):
        run = subprocess.run(cmd + ["--part", f"{i}/2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        assert "tokens/s; per worker process" in run.stdout
    assert "the other parts are not yet" not in run.stdout and "train " in run.stdout
    _same_dataset(out, whole)
    check = subprocess.run([sys.executable, "-m", "data_recipes.check", str(out), "--full", "--vocab-size", "100"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode == 2 and check.stderr.startswith("error: ") and "vocab_size" in check.stderr
