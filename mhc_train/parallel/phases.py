"""Phase-split execution of an overlapped forward/backward pair: the two chunks take turns.

DualPipe (DeepSeek-V3 Fig. 4) cuts the forward chunk of one micro-batch and the backward chunk of
another into phases at their communication points and interleaves them, so that one chunk's
all-to-all (or pipeline transfer) is in flight while the other chunk computes. Here each chunk
runs in its own thread and they hand a turn back and forth:

    B: compute ... issue its all-to-all (async) -> hand the turn to F
    F: compute ... issue its all-to-all (async) -> hand the turn to B
    B: wait for its all-to-all (usually done by now), compute ... -> hand the turn to F
    ...                                   a chunk that finishes hands the turn over for good

Only the holder of the turn runs, so every rank issues its collectives in one deterministic
order (the same on every rank of a group: same schedule, same chunks), the model's ops run
exactly as without overlap (bitwise the same results on CPU), and no chunk's compute competes
with the other's for the CPU. The communication points are where the parallel code waits for an
asynchronous collective (``wait_overlapped``: the expert all-to-all of ``expert_parallel``); the
model's forward stays the model's. Outside a pair ``wait_overlapped`` just waits.

Which chunk is calling is told by autograd: code running inside a backward graph task (the
backward chunk, also when it recomputes forward ops) is ``B``, anything else ``F`` - on CUDA the
backward runs in autograd's device thread, so a thread identity would not do.

``PairTurns.events`` records the order of phases and communication (for the tests) and
``CommRecorder`` the time of every issue, completion and wait (for ``mhc-train-bench-pipeline``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

_active: "PairTurns | None" = None  # the pair running on this process, if any
_recorder: "CommRecorder | None" = None


def calling_chunk() -> str:
    """``B`` inside a backward graph task, else ``F``."""
    return "B" if torch._C._current_graph_task_id() != -1 else "F"


class PairTurns:
    """Runs ``forward`` (worker thread) and ``backward`` (this thread) taking turns at their
    communication points; the backward chunk starts. ``events``: (chunk, what, label) in order."""

    def __init__(self, record: bool = False) -> None:
        self._cond = threading.Condition()
        self._turn = "B"
        self._done: set[str] = set()
        self.events: list[tuple[str, str, str]] | None = [] if record else None

    def note(self, chunk: str, what: str, label: str = "") -> None:
        if self.events is not None:
            self.events.append((chunk, what, label))

    def hand_over(self, chunk: str, label: str) -> None:
        """``chunk`` issued a collective: let the other chunk compute until it hands back."""
        other = "F" if chunk == "B" else "B"
        with self._cond:
            if other in self._done or self._turn != chunk:
                return  # the other chunk has finished (or this is not a pair member): carry on
            self.note(chunk, "issue", label)
            self._turn = other
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._turn == chunk)
            self.note(chunk, "resume", label)

    def _start(self, chunk: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == chunk)
        self.note(chunk, "start")

    def _finish(self, chunk: str) -> None:
        with self._cond:
            self.note(chunk, "end")
            self._done.add(chunk)
            self._turn = "F" if chunk == "B" else "B"
            self._cond.notify_all()

    def run(self, forward: Callable[[], None], backward: Callable[[], None],
            forward_context: Callable = None) -> None:
        global _active
        if _active is not None:
            raise RuntimeError("one overlapped pair at a time")
        error: list[BaseException] = []

        def run_forward():
            try:
                self._start("F")
                forward()
            except BaseException as exc:  # re-raised in the calling thread
                error.append(exc)
            finally:
                self._finish("F")

        _active = self
        worker = threading.Thread(target=run_forward, name="pp-pair-forward")
        worker.start()
        try:
            self._start("B")
            try:
                backward()
            finally:
                self._finish("B")
        finally:
            worker.join()
            _active = None
        if error:
            raise error[0]


@dataclass
class CommRecord:
    label: str
    chunk: str
    issued: float
    completed: float | None = None  # when the collective finished (its future's callback)
    wait: tuple[float, float] | None = None  # when this rank blocked on it


@dataclass
class CommRecorder:
    """Times of every asynchronous collective that went through ``wait_overlapped``."""

    records: list[CommRecord] = field(default_factory=list)

    def issued(self, label: str, work) -> CommRecord:
        rec = CommRecord(label, calling_chunk(), time.perf_counter())
        self.records.append(rec)
        try:
            work.get_future().then(lambda _: setattr(rec, "completed", time.perf_counter()))
        except (RuntimeError, AttributeError):  # a backend without futures: the wait's end bounds it
            pass
        return rec


def set_comm_recorder(recorder: CommRecorder | None) -> None:
    global _recorder
    _recorder = recorder


def wait_overlapped(work, label: str) -> None:
    """Wait for an asynchronous collective issued just before; inside an overlapped pair the other
    chunk first computes its next phase (``PairTurns.hand_over``)."""
    rec = _recorder.issued(label, work) if _recorder is not None else None
    pair = _active
    if pair is not None:
        pair.hand_over(calling_chunk(), label)
    start = time.perf_counter()
    work.wait()
    if rec is not None:
        rec.wait = (start, time.perf_counter())
        if rec.completed is None or rec.completed > rec.wait[1]:
            rec.completed = rec.wait[1]
    if pair is not None:
        pair.note(calling_chunk(), "waited", label)


__all__ = ["CommRecord", "CommRecorder", "PairTurns", "calling_chunk", "set_comm_recorder", "wait_overlapped"]
