"""One writer per run directory, and only where it can write.

- a second run in a run directory (in this process, and under torchrun with 2 ranks) is refused
  with one line naming the first one's PID and host, before Hydra rewrites ``.hydra/``; the first
  run goes on; after the first is SIGKILLed, its lock file does not block the next run;
- a sweep with one busy directory starts none of its jobs;
- a forked child does not keep its parent's lock;
- an ``output_root`` that is a file, lies under a file or /proc, or is read-only is refused up
  front, naming ``output_root``, and no directory is created.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import TINY, restore_logging, run  # noqa: F401  (a fixture too)

from mhc_train.train import run_lock
from mhc_train.train.app import prevalidate
from mhc_train.train.checkpoint import complete_checkpoints


@pytest.fixture(scope="module")
def cache(subprocess_env):
    """In-process runs use conftest's session dataset cache (built once for every test file)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MHC_TRAIN_CACHE", subprocess_env["MHC_TRAIN_CACHE"])
        yield Path(subprocess_env["MHC_TRAIN_CACHE"])


SHARED = ["run_name=shared", "parallel=ddp", "train.steps=100000", "train.checkpoint_every=10",
          "train.keep_checkpoints=1"]


def _wait_for(what, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _lock_pid(d: Path) -> int | None:
    try:
        return json.loads((d / run_lock.LOCK_NAME).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_a_second_run_is_refused_and_a_killed_holder_never_blocks(subprocess_env, cache, tmp_path, capsys):
    out = tmp_path / "runs"
    args = [*TINY, f"output_root={out}", *SHARED]
    with open(tmp_path / "first.log", "w") as first_log:
        first = subprocess.Popen([sys.executable, "-m", "mhc_train.train", *args, "train.threads=1"], cwd=tmp_path,
                                 env=subprocess_env, stdout=first_log, stderr=subprocess.STDOUT)
    try:
        d = _wait_for(lambda: next((p.parent for p in out.glob("default/shared+*/.hydra")), None)
                      or first.poll() is not None)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        _wait_for(lambda: _lock_pid(d) == first.pid and complete_checkpoints(d / "checkpoints"))
        first.send_signal(signal.SIGSTOP)  # alive and holding the lock, but leaving the 2 cores to the others
        hydra_config = (d / ".hydra" / "config.yaml").read_bytes()
        refused = f"run directory in use: {d} is being written by PID {first.pid} on host {socket.gethostname()} "

        # the same directory (logging.log_every is left out of its name), in this process
        assert run(out, *SHARED, "logging.log_every=5") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(refused), err

        # and under torchrun: rank 0 is refused before Hydra, rank 1 learns it in its first collective
        t1 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "mhc_train.train", *args, "logging.log_every=5"], cwd=tmp_path, env=subprocess_env,
                              capture_output=True, text=True, timeout=120)
        log = proc.stdout + proc.stderr
        assert proc.returncode != 0 and time.monotonic() - t1 < 60, log[-3000:]
        assert log.count(refused) == 1, log[-3000:]
        assert "exitcode  : 2" in log and "Timed out" not in log, log[-3000:]  # rank 0's 2; no timeout waited out

        assert (d / ".hydra" / "config.yaml").read_bytes() == hydra_config  # not rewritten by the refused runs
        steps = len((d / "metrics.jsonl").read_text().splitlines())
        first.send_signal(signal.SIGCONT)
        _wait_for(lambda: len((d / "metrics.jsonl").read_text().splitlines()) > steps + 5)  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)

    # the killed holder's lock file is still there, with its PID; it no longer blocks
    assert _lock_pid(d) == first.pid
    step = complete_checkpoints(d / "checkpoints")[-1][0]
    assert run(out, *SHARED, f"train.stop_at={step + 1}") == 0
    log = (d / "mhc-train.log").read_text()
    assert f"resumed from {d / 'checkpoints' / f'step_{step:07d}'} at step {step}" in log
    assert _lock_pid(d) == os.getpid()


def test_a_sweep_with_one_busy_run_dir_starts_none(cache, tmp_path, capsys):
    out = tmp_path / "runs"
    sweep = ["-m", "residual=baseline,hc", "train.steps=2"]
    code, jobs = prevalidate([*sweep, *TINY, f"output_root={out}"])
    assert code == 0 and [Path(j.run_dir).parent for j in jobs] == [out / "default"] * 2
    busy = Path(jobs[1].run_dir)
    busy.mkdir(parents=True)
    fd = os.open(busy / run_lock.LOCK_NAME, os.O_RDWR | os.O_CREAT)  # another holder (own open file)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"pid": 4242, "host": "elsewhere", "started": "then"}).encode())
        assert run(out, *sweep) == 2
    finally:
        os.close(fd)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"run directory in use: {busy} is being written by PID 4242 on host elsewhere (since then) "
                   f"(lock {busy / run_lock.LOCK_NAME}); wait for it to end or stop it, or choose another "
                   f"run_name / output_root"], err
    # the first job never started: its directory holds only the lock file taken before the refusal
    for job in jobs:
        assert [p.name for p in Path(job.run_dir).iterdir()] == [run_lock.LOCK_NAME]


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    run_lock.hold(tmp_path)
    try:
        child = os.fork()
        if child == 0:  # outlives its parent's hold
            time.sleep(5)
            os._exit(0)
    finally:
        run_lock.release_all()
    fd = os.open(tmp_path / run_lock.LOCK_NAME, os.O_RDWR)
    try:
        def free() -> bool:  # once the child has run its after-fork hook (it may not have yet)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        _wait_for(free, timeout=5)  # the child, still alive, would hold it for 5 s
        assert os.waitpid(child, os.WNOHANG) == (0, 0)
    finally:
        os.close(fd)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def _read_only_dir(tmp_path: Path) -> Path:
    where = tmp_path / "read-only"
    where.mkdir()
    if os.geteuid() != 0:
        where.chmod(0o555)
        return where
    # root ignores permission bits (os.access says writable too): a read-only mount is read-only for root
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("running as root without permission to mount: no read-only directory to try")
    return where


@pytest.mark.parametrize("case", ["a file", "under a file", "under /proc", "read-only"])
def test_unusable_output_root_is_refused_up_front(cache, tmp_path, capsys, case):
    (tmp_path / "file").write_text("x")
    root, says = {
        "a file": (tmp_path / "file", f"{tmp_path / 'file'} is not a directory"),
        "under a file": (tmp_path / "file" / "runs",
                         f"{tmp_path / 'file' / 'runs'} cannot be created: {tmp_path / 'file'} is not a directory"),
        "under /proc": (Path("/proc/mhc-train-runs"), "/proc/mhc-train-runs is not writable (in /proc): "),
        "read-only": (None, "is not writable: Read-only file system" if os.geteuid() == 0 else "is not writable: "),
    }[case]
    if root is None:
        root = _read_only_dir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        assert run(root, "train.steps=2") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"config error: output_root: {root if case == 'read-only' else ''}")
        assert says in err[0], err
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        if case == "read-only":
            assert list(root.iterdir()) == []
    finally:
        if case == "read-only" and os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(root)], capture_output=True)
