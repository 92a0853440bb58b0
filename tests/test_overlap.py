"""DualPipe-style phase-split overlap: the turn-taking of two chunks (unit), and DualPipeV's
overlapped pairs under pp=2 x ep=2 against the same schedule in order (4 processes)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from mhc_train.parallel.phases import CommRecorder, PairTurns, set_comm_recorder, wait_overlapped

SCRIPT = Path(__file__).resolve().parent / "dist_scripts" / "overlap_check.py"


class _Done:
    """A finished asynchronous collective (what ``wait_overlapped`` waits for)."""

    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def wait(self) -> None:
        self.log.append(f"wait {self.name}")

    def get_future(self):
        raise RuntimeError("no future")


def _backward_chunk(steps: list, log: list):
    """A backward chunk: its communication points are inside an autograd backward."""

    class Comm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, name):
            ctx.name = name
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            log.append(f"B computes before {ctx.name}")
            wait_overlapped(_Done(log, ctx.name), ctx.name)
            return grad, None

    def run():
        x = torch.ones(2, requires_grad=True)
        y = x
        for name in reversed(steps):  # backward meets them in the listed order
            y = Comm.apply(y, name)
        y.sum().backward()

    return run


def _forward_chunk(steps: list, log: list):
    def run():
        for name in steps:
            log.append(f"F computes before {name}")
            wait_overlapped(_Done(log, name), name)
        log.append("F computes its last phase")

    return run


def test_chunks_take_turns_at_their_communication_points():
    log: list[str] = []
    turns = PairTurns(record=True)
    turns.run(_forward_chunk(["dispatch", "combine"], log), _backward_chunk(["combine.bwd", "dispatch.bwd"], log))
    assert log == [
        "B computes before combine.bwd",  # B starts; at its collective the turn goes to F
        "F computes before dispatch",
        "wait combine.bwd",  # B waits for its collective only when the turn is back
        "B computes before dispatch.bwd",
        "wait dispatch",
        "F computes before combine",
        "wait dispatch.bwd",  # B finishes: F runs to its end without handing over again
        "wait combine",
        "F computes its last phase",
    ]
    chunks = [(c, w) for c, w, _ in turns.events]
    assert chunks[:3] == [("B", "start"), ("B", "issue"), ("F", "start")]
    assert ("B", "end") in chunks and chunks[-1] == ("F", "end")


def test_a_chunk_without_communication_runs_through_and_errors_reach_the_caller():
    log: list[str] = []
    PairTurns().run(_forward_chunk([], log), _backward_chunk(["combine.bwd"], log))
    assert log == ["B computes before combine.bwd", "F computes its last phase", "wait combine.bwd"]

    def failing():
        raise ValueError("forward chunk failed")

    with pytest.raises(ValueError, match="forward chunk failed"):
        PairTurns().run(failing, _backward_chunk(["x"], []))
    assert threading.active_count() >= 1  # the worker was joined; a new pair can start
    PairTurns().run(_forward_chunk(["a"], []), _backward_chunk(["b"], []))


def test_outside_a_pair_waiting_is_plain_and_recorded():
    log: list[str] = []
    recorder = CommRecorder()
    set_comm_recorder(recorder)
    try:
        wait_overlapped(_Done(log, "dispatch"), "dispatch")
    finally:
        set_comm_recorder(None)
    assert log == ["wait dispatch"]
    (rec,) = recorder.records
    assert rec.label == "dispatch" and rec.chunk == "F" and rec.wait[0] <= rec.wait[1] and rec.completed is not None


def test_overlapped_pairs_equal_the_schedule_in_order_under_pp2_ep2(subprocess_env):
    """mHC and baseline with recompute off and auto, HC: losses, gradients, router loads and biases,
    parameters after two steps bitwise equal; every rank's recorded pairs interleave."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                           str(SCRIPT)], env=subprocess_env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert out.count(" ok ") == 5, out[-3000:]
