"""A rank that dies or hangs under torchrun (CPU, gloo, 2 DDP processes, tiny model).

tests/dist_scripts/kill_one_rank.py runs mhc-train with Trainer._train_step patched so that rank 1
SIGKILLs itself (or hangs) right after step 3, i.e. after the step-2 checkpoint
(train.checkpoint_every=2) and before the step-4 one.

- dead rank: rank 0 learns it at its next collective from the closed socket (gloo: "Connection
  reset / closed by peer", ~1 s), the whole job exits non-zero with torchrun's ChildFailedError
  naming rank 1's SIGKILL; the step-2 checkpoint stays intact. Measured ~6-9 s per launch, mostly
  start-up; the collective timeout plays no part.
- hung rank (alive, socket open, silent): only the process-group timeout ends rank 0's wait
  (parallel.timeout_s, default 1800 s; here 8 s), then torchrun stops the hung rank.
- torchrun --max-restarts=1 with the death in the first attempt only: the restarted workers
  resume (resume=auto) from the step-2 checkpoint and finish; metrics.jsonl reads as one
  uninterrupted history (the JSONL sink drops what was logged after the checkpoint) and the losses
  equal an uninterrupted run's bit for bit (model, optimizer, scheduler, data position and RNG
  are restored; same ranks, same reduction order on CPU).

torch 2.13 (and since 2.5): torchrun's workers share the rendezvous TCPStore of the agent, and
after a restart the new workers read the previous attempt's gloo addresses from it ("Gloo
connectFullMesh failed ... Connection refused"; pytorch/pytorch#135712). The restart test sets
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, the fix that issue gives; a launcher using --max-restarts
needs it too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "kill_one_rank.py"
STEPS = 6
KILL_STEP = 3
COMMON = ["model=tiny", "train.seq_len=32", "train.grad_accum=2", "optim.warmup_steps=2", "optim.schedule=constant",
          f"train.steps={STEPS}", "train.eval_every=0", "train.gains_every=0", "train.eval_batches=2",
          "train.threads=1", "train.checkpoint_every=2", "logging.progress=false", "logging.plots=false",
          "parallel=ddp", "train.batch_size=2"]
LAUNCH_TIMEOUT = 120  # a hang of the job itself fails the test instead of the suite
BOUND_S = 60.0


@pytest.fixture(scope="module")
def env(subprocess_env) -> dict:
    e = dict(subprocess_env)
    for k in ("MHC_KILL_RANK", "MHC_KILL_STEP", "MHC_KILL_ATTEMPT", "MHC_HANG"):
        e.pop(k, None)
    return e


def torchrun(env: dict, cwd: Path, target: list[str], *overrides: str, restarts: int = 0) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", *target, *COMMON, *overrides]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def run_dir(out: Path, name: str) -> Path:
    dirs = [p.parent for p in (out / "default").glob(f"{name}+*/metrics.jsonl")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def records(d: Path, kind: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def test_a_killed_rank_fails_the_job_quickly(env, tmp_path):
    out = tmp_path / "runs"
    rc, log, elapsed = torchrun({**env, "MHC_KILL_STEP": str(KILL_STEP)}, tmp_path,
                                [str(SCRIPT)], f"output_root={out}", "run_name=killed", "parallel.timeout_s=20")
    print(f"killed rank: rc={rc}, {elapsed:.1f} s")
    assert rc != 0, log[-4000:]
    assert elapsed < BOUND_S, (elapsed, log[-4000:])
    assert f"kill_one_rank: rank 1 SIGKILLs itself after step {KILL_STEP}" in log
    assert "ChildFailedError" in log and "Signal 9 (SIGKILL) received by PID" in log, log[-4000:]
    # Rank 0 stops either through its own gloo error ("Connection reset / closed by peer") or,
    # when torchrun notices the dead rank first, through torchrun's SIGTERM: which comes first
    # is a race, both end the job.
    assert "by peer" in log or "closing signal SIGTERM" in log, log[-4000:]
    d = run_dir(out, "killed")
    assert [r["step"] for r in records(d, "train")] == [1, 2]
    ends = records(d, "end")
    assert not ends or ends[-1]["status"] in ("failed", "interrupted"), ends
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["step_0000002"]
    assert (d / "checkpoints" / "step_0000002" / "meta.json").is_file()


def test_a_hung_rank_fails_the_job_after_the_collective_timeout(env, tmp_path):
    out = tmp_path / "runs"
    timeout_s = 8
    rc, log, elapsed = torchrun({**env, "MHC_KILL_STEP": str(KILL_STEP), "MHC_HANG": "1"}, tmp_path,
                                [str(SCRIPT)], f"output_root={out}", "run_name=hung", f"parallel.timeout_s={timeout_s}")
    print(f"hung rank: rc={rc}, {elapsed:.1f} s")
    assert rc != 0, log[-4000:]
    assert timeout_s <= elapsed < BOUND_S, (elapsed, log[-4000:])
    assert f"kill_one_rank: rank 1 hangs after step {KILL_STEP}" in log
    assert f"Timed out waiting {timeout_s * 1000}ms" in log and "ChildFailedError" in log, log[-4000:]
    d = run_dir(out, "hung")
    assert [r["step"] for r in records(d, "train")] == [1, 2]
    assert (d / "checkpoints" / "step_0000002" / "meta.json").is_file()


def test_max_restarts_resumes_from_the_last_checkpoint_like_an_uninterrupted_run(env, tmp_path):
    out = tmp_path / "runs"
    env = {**env, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # pytorch/pytorch#135712, see the docstring
    rc, log, elapsed = torchrun(env, tmp_path, ["-m", "mhc_train.train"], f"output_root={out}", "run_name=reference")
    assert rc == 0, log[-4000:]
    reference = records(run_dir(out, "reference"), "train")
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))

    rc, log, elapsed = torchrun({**env, "MHC_KILL_STEP": str(KILL_STEP)}, tmp_path,
                                [str(SCRIPT)], f"output_root={out}", "run_name=restarted", "parallel.timeout_s=20",
                                restarts=1)
    print(f"killed, restarted, finished: rc={rc}, {elapsed:.1f} s")
    assert rc == 0, log[-6000:]
    assert elapsed < BOUND_S, elapsed
    assert log.count("kill_one_rank: rank 1 SIGKILLs itself") == 1  # first attempt only
    d = run_dir(out, "restarted")
    ckpt = d / "checkpoints" / "step_0000002"
    assert f"resumed from {ckpt} at step 2" in (d / "mhc-train.log").read_text()
    runs = records(d, "run")
    assert [r["resumed_from"] for r in runs] == [None, str(ckpt)]
    got = records(d, "train")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # each step once
    for r, ref in zip(got, reference):  # bitwise: same ranks, same order of reductions, state restored
        assert (r["loss"], r["grad_norm"], r["lr"], r["tokens"]) == \
               (ref["loss"], ref["grad_norm"], ref["lr"], ref["tokens"]), (r["step"], r, ref)
        assert r.get("load_imbalance") == ref.get("load_imbalance")
    assert records(d, "end")[-1]["status"] == "complete"
    assert sorted(p.name for p in (d / "checkpoints").iterdir())[-1] == f"step_{STEPS:07d}"
