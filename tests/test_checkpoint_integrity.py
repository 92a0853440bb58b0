"""Checkpoints that cannot be trusted are never used, and a failed write leaves nothing behind.

Unit level (a small module, DCP in this process): meta.json lists the size and hash of every file;
``verify`` names each kind of damage; a load that fails (torch's CheckpointException, non-finite
tensors) is CheckpointUnusable; rotation interrupted at any point leaves no ``step_*`` directory
that looks complete without its files; a full disk at the write call removes the ``.tmp`` and
says which checkpoint is intact.

End to end (the Hydra app in this process, tiny model): a damaged newest checkpoint is skipped
for the previous one and the continuation equals, bit for bit, a run resumed explicitly from that
previous checkpoint; with no usable checkpoint the run stops (exit 2) without touching
metrics.jsonl; a full disk (simulated at DCP's write call, and a real tmpfs where this test may
mount one) stops with one line and exit 4; a second Ctrl-C says the truth about checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import restore_logging, run, run_dir, train_records  # noqa: F401  (a fixture too)

from mhc_train.train import checkpoint
from mhc_train.train.checkpoint import META, STATE, CheckpointManager, ModelState, is_complete, load_checkpoint, verify
from mhc_train.train.errors import CheckpointUnusable, CheckpointWriteError

SHARD = "__0_0.distcp"


@pytest.fixture(scope="module")
def cache(subprocess_env):
    """In-process runs use conftest's session dataset cache (built once for every test file)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MHC_TRAIN_CACHE", subprocess_env["MHC_TRAIN_CACHE"])
        yield Path(subprocess_env["MHC_TRAIN_CACHE"])


def _rewrite(path: Path, change) -> None:
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(change(data)))


def _zero_middle(data: bytearray) -> bytearray:
    """4 KiB of zeros from the middle on, where they change something (not over zeros)."""
    start = next(i for i in range(len(data) // 2, len(data), 4096) if any(data[i:i + 4096]))
    data[start:start + 4096] = bytes(len(data[start:start + 4096]))
    return data


# name -> (damage done to a checkpoint directory, what verify says)
DAMAGES = {
    "truncated shard": (lambda d: _rewrite(d / SHARD, lambda b: b[: len(b) // 2]), "bytes, "),
    "zeroed middle of the shard": (lambda d: _rewrite(d / SHARD, _zero_middle), "does not match its"),
    "random bytes in the shard": (lambda d: _rewrite(d / SHARD, lambda b: os.urandom(len(b))), "does not match its"),
    "missing shard": (lambda d: (d / SHARD).unlink(), f"{SHARD} is missing"),
    "garbage trainer_state.json": (lambda d: _rewrite(d / STATE, lambda b: b"{" * len(b)), f"{STATE} does not match"),
    "garbage .metadata": (lambda d: _rewrite(d / ".metadata", lambda b: os.urandom(len(b))),
                          ".metadata does not match"),
}


def _without_checksums(d: Path) -> None:
    meta = json.loads((d / META).read_text())
    del meta["files"]
    (d / META).write_text(json.dumps(meta))


# verify passes (nothing to verify), the load fails: the trainer falls back after a partial load
UNVERIFIED = {"random bytes in the shard of a checkpoint without checksums":
              (lambda d: (_without_checksums(d), DAMAGES["random bytes in the shard"][0](d)), "cannot load tensors")}


def _model_state(seed: int = 0) -> ModelState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    return ModelState(model, opt)


# --------------------------------------------------------------------------------- unit level


def test_meta_json_lists_every_file_and_verify_names_each_damage(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep=5)
    good = manager.save(1, _model_state(), {"step": 1}, {"note": "x"})
    meta = json.loads((good / META).read_text())
    assert sorted(meta["files"]) == [".metadata", SHARD, STATE]
    for name, entry in meta["files"].items():
        assert entry["size"] == (good / name).stat().st_size and len(entry[checkpoint.hash_algorithm()]) >= 32
    assert verify(good) is None and is_complete(good) and manager.last_good == good
    for i, (kind, (damage, says)) in enumerate(DAMAGES.items()):
        copy = tmp_path / "checkpoints" / f"step_{100 + i:07d}"
        shutil.copytree(good, copy)
        damage(copy)
        problem = verify(copy)
        assert problem is not None and says in problem, (kind, problem)
    (good / META).unlink()
    assert verify(good) == f"no {META} (not a complete checkpoint)" and not is_complete(good)


def test_failed_loads_are_checkpoint_unusable(tmp_path, caplog):
    state = _model_state()
    manager = CheckpointManager(tmp_path / "checkpoints", keep=5)
    legacy = manager.save(1, state, {"step": 1}, {})
    _without_checksums(legacy)  # as written before checksums existed: loads, unverified, with a warning
    with caplog.at_level("WARNING", logger="mhc_train.train"):
        assert verify(legacy) is None
    assert "written without checksums" in caplog.text
    assert load_checkpoint(legacy, _model_state(1))["step"] == 1

    # garbage .metadata that nothing verifies: torch raises its CheckpointException (a BaseException)
    _rewrite(legacy / ".metadata", lambda b: os.urandom(len(b)))
    with pytest.raises(CheckpointUnusable, match=r"unreadable \.metadata \("):  # UnpicklingError, MemoryError, ...
        load_checkpoint(legacy, _model_state(1))
    assert "Traceback" not in caplog.text  # torch's loader would have logged two

    # checksums cannot catch NaN written by the training itself: the load does
    with torch.no_grad():
        state.module[0].weight[0, 0] = float("nan")
    nan = manager.save(2, state, {"step": 2}, {})
    assert verify(nan) is None
    with pytest.raises(CheckpointUnusable, match=r"non-finite values in model\.0\.weight"):
        load_checkpoint(nan, _model_state(1))


def test_rotation_interrupted_anywhere_leaves_no_complete_looking_directory(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    manager = CheckpointManager(directory, keep=2)
    state = _model_state()
    manager.save(1, state, {"step": 1}, {})
    manager.save(2, state, {"step": 2}, {})

    real_rmtree = shutil.rmtree

    def crash_after_one_file(path, ignore_errors=False):
        if ".old-" not in str(path) and "step_0000002" not in str(path):
            return real_rmtree(path, ignore_errors=ignore_errors)
        victim = next(p for p in sorted(Path(path).iterdir()) if p.name.endswith(".distcp"))
        victim.unlink()
        raise KeyboardInterrupt  # killed mid-delete

    monkeypatch.setattr(checkpoint.shutil, "rmtree", crash_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        manager.save(3, state, {"step": 3}, {})  # step 3 complete, rotating step 1 out is killed
    monkeypatch.undo()
    names = sorted(p.name for p in directory.iterdir())
    assert names == [f"step_0000001.old-{os.getpid()}", "step_0000002", "step_0000003"], names
    assert all(verify(directory / n) is None for n in names if n.startswith("step_") and ".old-" not in n)
    manager.remove_partial()  # the next launch
    assert sorted(p.name for p in directory.iterdir()) == ["step_0000002", "step_0000003"]

    # where renaming aside fails, the marker goes first
    monkeypatch.setattr(checkpoint.os, "rename", lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, "no")))
    monkeypatch.setattr(checkpoint.shutil, "rmtree", crash_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.discard(directory / "step_0000002")
    assert not (directory / "step_0000002" / META).exists() and not is_complete(directory / "step_0000002")


def test_full_disk_at_the_write_call_removes_the_partial_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path / "checkpoints", keep=2)
    state = _model_state()
    with disk_full_at("step_0000001.tmp", monkeypatch), pytest.raises(CheckpointWriteError) as e:
        manager.save(1, state, {"step": 1}, {})
    final = tmp_path / "checkpoints" / "step_0000001"
    assert str(e.value) == (f"no space left on device writing checkpoint step 1 to {final}; "
                            f"no previous checkpoint (none yet)")
    assert list((tmp_path / "checkpoints").iterdir()) == []
    first = manager.save(1, state, {"step": 1}, {})
    with disk_full_at("step_0000002.tmp", monkeypatch), pytest.raises(CheckpointWriteError) as e:
        manager.save(2, state, {"step": 2}, {})
    assert str(e.value).endswith(f"; the previous checkpoint step 1 is intact ({first})")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000001"] and verify(first) is None


@contextlib.contextmanager
def disk_full_at(marker: str, monkeypatch):
    """DCP's write of a tensor into a file under ``marker`` writes a little, then fails: ENOSPC."""
    import torch.distributed.checkpoint.filesystem as fs

    real = fs._write_item

    def write_item(transforms, stream, data, *args, **kwargs):
        if marker in str(getattr(stream, "name", "")):
            stream.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(transforms, stream, data, *args, **kwargs)

    monkeypatch.setattr(fs, "_write_item", write_item)
    try:
        yield
    finally:
        monkeypatch.setattr(fs, "_write_item", real)


TWO_RANKS = r"""
import errno, json, os, sys
from pathlib import Path
import torch, torch.distributed as dist
import torch.distributed.checkpoint.filesystem as fs
from mhc_train.train.checkpoint import META, CheckpointManager, verify
from mhc_train.train.errors import CheckpointWriteError

rank, store, directory = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)

class RankState:  # tensors only this rank holds: every rank writes its own shard file
    def state_dicts(self):
        return {f"w{rank}": torch.arange(50_000, dtype=torch.float32) + rank}, {}

manager = CheckpointManager(directory, keep=2, rank=rank)
path = manager.save(1, RankState(), {"step": 1}, {})
files = json.loads((path / META).read_text())["files"]
assert sorted(files) == [".metadata", "__0_0.distcp", "__1_0.distcp", "trainer_state.json"], sorted(files)
assert files["__1_0.distcp"]["size"] == (path / "__1_0.distcp").stat().st_size
assert verify(path) is None
dist.barrier()
if rank == 1:
    data = bytearray((path / "__1_0.distcp").read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = bytes(4096)
    (path / "__1_0.distcp").write_bytes(bytes(data))
dist.barrier()
assert verify(path) == "__1_0.distcp does not match its xxh3_128 checksum", verify(path)  # on both ranks

if rank == 1:  # a full disk on rank 1 only
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    fs._write_item = full
try:
    manager.save(2, RankState(), {"step": 2}, {})
    raise AssertionError("saved on a full disk")
except CheckpointWriteError as e:
    assert str(e).startswith("no space left on device writing checkpoint step 2 to "), e
dist.barrier()
assert sorted(p.name for p in directory.iterdir()) == ["step_0000001"]  # rank 0 removed the .tmp
print(f"rank {rank} ok")
dist.destroy_process_group()
"""


def test_two_ranks_list_every_shard_and_stop_together_on_a_full_disk(subprocess_env, tmp_path):
    ranks = [subprocess.Popen([sys.executable, "-c", TWO_RANKS, str(rank), str(tmp_path / "store"),
                               str(tmp_path / "checkpoints")], env=subprocess_env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=120)[0] for p in ranks]
    for rank, (p, out) in enumerate(zip(ranks, outputs)):
        assert p.returncode == 0 and f"rank {rank} ok" in out, out[-3000:]


# --------------------------------------------------------------------------------- end to end

RUN = ["train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=3", "run_name=r"]


@pytest.fixture(scope="module")
def paused(cache, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """A run paused at step 4 (checkpoints 2 and 4), and the losses of steps 3-6 of a run resumed
    explicitly from its step-2 checkpoint (what skipping a damaged step 4 must reproduce)."""
    root = tmp_path_factory.mktemp("paused")
    assert run(root / "runs", *RUN, "train.stop_at=4") == 0
    d = run_dir(root / "runs", name="r")
    assert run(root / "reference", *RUN, f"resume={d / 'checkpoints' / 'step_0000002'}") == 0
    reference = {r["step"]: r["loss"] for r in train_records(run_dir(root / "reference", name="r"))}
    assert sorted(reference) == [3, 4, 5, 6]
    return root / "runs", reference


def _copy(paused_root: Path, to: Path) -> Path:
    shutil.copytree(paused_root, to, symlinks=True)
    return run_dir(to, name="r")


@pytest.mark.parametrize("kind", [*DAMAGES, *UNVERIFIED])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(paused, tmp_path, kind):
    paused_root, reference = paused
    d = _copy(paused_root, tmp_path / "runs")
    damage, says = {**DAMAGES, **UNVERIFIED}[kind]
    damage(d / "checkpoints" / "step_0000004")
    assert run(tmp_path / "runs", *RUN) == 0  # resume=auto
    log = (d / "mhc-train.log").read_text()
    assert f"skipping checkpoint {d / 'checkpoints' / 'step_0000004'}: " in log and says in log, log[-2000:]
    assert f"resumed from {d / 'checkpoints' / 'step_0000002'} at step 2" in log
    losses = {r["step"]: r["loss"] for r in train_records(d)}
    assert {s: losses[s] for s in reference} == reference  # bitwise
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]  # metrics.jsonl cut back to step 2, then continued


def _outputs(d: Path) -> dict[Path, bytes]:
    """What a run leaves (this launch's own .hydra/, log and lock aside)."""
    return {p: p.read_bytes() for p in d.rglob("*")
            if p.is_file() and p.parent.name != ".hydra" and p.name not in ("mhc-train.log", ".lock")}


def test_no_usable_checkpoint_stops_the_run_and_changes_nothing(paused, tmp_path, capsys):
    both = ("step_0000002", "step_0000004")
    for case, damage in (("damaged", lambda c: [_rewrite(c / s / SHARD, _zero_middle) for s in both]),
                         ("no meta.json", lambda c: [(c / s / META).unlink() for s in both])):
        d = _copy(paused[0], tmp_path / case)
        damage(d / "checkpoints")
        before = _outputs(d)
        capsys.readouterr()
        assert run(tmp_path / case, *RUN) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"checkpoint error: no usable checkpoint in {d / 'checkpoints'} "
                                                   f"(step_0000004: "), err
        assert "step_0000002: " in err[0] and "resume=none" in err[0]
        after = _outputs(d)
        assert after == before, case  # metrics.jsonl not rewritten, checkpoints untouched 


def test_disk_full_while_checkpointing_stops_with_one_line(cache, tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    with disk_full_at("step_0000004.tmp", monkeypatch):
        assert run(out, *RUN) == 4
    d = run_dir(out, name="r")
    ckpts = d / "checkpoints"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"write error: no space left on device writing checkpoint step 4 to {ckpts / 'step_0000004'}; "
                   f"the previous checkpoint step 2 is intact ({ckpts / 'step_0000002'})"]
    assert [p.name for p in ckpts.iterdir()] == ["step_0000002"]  # the .tmp removed at once
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kind"] == "end" and rows[-1]["status"] == "failed"


def test_second_signal_names_only_a_checkpoint_that_exists(cache, tmp_path, capsys, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from mhc_train.train.trainer import Trainer

    real_step = Trainer._train_step

    def second_signal_at_step_1(self):
        if self.step == 1:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "_train_step", second_signal_at_step_1)
    assert run(tmp_path / "a", *RUN) == 130
    assert capsys.readouterr().err.strip() == \
        "interrupted: aborted (second signal); no checkpoint was saved or resumed from by this run"
    monkeypatch.undo()

    real_save = dcp.save

    def second_signal_while_saving_step_4(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)
        if checkpoint_id.endswith("step_0000004.tmp"):
            raise KeyboardInterrupt

    monkeypatch.setattr(dcp, "save", second_signal_while_saving_step_4)
    assert run(tmp_path / "b", *RUN) == 130
    ckpts = run_dir(tmp_path / "b", name="r") / "checkpoints"
    assert capsys.readouterr().err.strip() == (
        f"interrupted: aborted (second signal); the last checkpoint, {ckpts / 'step_0000002'}, is intact; "
        f"the same command continues from it")
    assert [p.name for p in ckpts.iterdir()] == ["step_0000002"]  # the half-written step 4 removed at once


# ------------------------------------------------------------------------- a real full disk


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture
def small_tmpfs(paused, tmp_path):
    """A tmpfs with room for the run's files and one and a half checkpoints (skipped where this
    process may not mount one)."""
    size = sum(p.stat().st_size for p in (run_dir(paused[0], name="r") / "checkpoints" / "step_0000002").iterdir())
    where = tmp_path / "small"
    if sys.platform != "linux" or not _mount_tmpfs(where, f"size={int(size * 1.5) + 400_000}"):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


def test_a_real_full_disk(small_tmpfs, capsys):
    assert run(small_tmpfs, *RUN) == 4
    ckpts = run_dir(small_tmpfs, name="r") / "checkpoints"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"write error: no space left on device writing checkpoint step 4 to {ckpts / 'step_0000004'}; "
                   f"the previous checkpoint step 2 is intact ({ckpts / 'step_0000002'})"], err
    assert [p.name for p in ckpts.iterdir()] == ["step_0000002"] and verify(ckpts / "step_0000002") is None
