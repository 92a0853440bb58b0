"""Pipeline step profile: tokens/s and where each rank's step time goes (compute, pipeline
bubble, exposed communication, runtime overhead), how much of its communication ran while it
computed, beside the simulator's ideal for the same measured chunk times.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m mhc_train.bench.pipeline_profile \\
        --model tiny --residual baseline mhc --schedule 1f1b zbv dualpipev --microbatches 4 \\
        --batch 8 --seq 64 --steps 5 [--threads 1] [--json out.json] [--trace trace.json]
    python -m torch.distributed.run --standalone --nproc_per_node=4 -m mhc_train.bench.pipeline_profile \\
        --model tiny --layers 8 --schedule dualpipev --ep 2 --overlap on off --png timeline.png

Needs torchrun with >= 2 pipeline ranks (gloo on CPU, NCCL with one GPU per rank). ``--ep E``
lays the world out as pp x E (``mhc_train.parallel.mesh``: pp outermost, ep innermost): E data
ranks, each running its own pipeline of world / E ranks on its own ``--batch`` sequences (the
batch is per data rank), with every MoE layer's routed experts sharded over the E ranks that hold
the same stage and its tokens routed by all-to-all. No FSDP: the data ranks' gradient reduction
(and the optimizer) are not part of what is measured. ``--overlap on off`` runs DualPipeV both
ways: ``on`` with the overlap handler's phase-split pairs (``concurrency=phases``: a chunk's
all-to-all and pipeline transfers proceed while the other chunk computes), ``off`` with the same
handler running each pair in the runtime's order (``concurrency=sequential``: bitwise the same
results, receives waited before the pair and sends posted after it; the handler stays, so the
pair is timed alike). Other schedules have no pairs and run once. Every (residual, schedule,
overlap) case is built once, warmed up, then profiled in interleaved rounds (case A, case B, ...,
A, B, ...) so that machine noise hits them alike. Each profiled step starts after a barrier, so a
step is the schedule's makespan as the simulator defines it.

Method (instrumentation of torch.distributed.pipelining's runtime, no sampling profiler):

- Compute: every stage's ``forward_one_chunk`` (F), ``backward_one_chunk`` (B when full, I when
  it computes only the input gradient) and ``backward_weight_one_chunk`` (W) is timed, and the
  loss of the last stage (the schedule's ``_maybe_compute_loss``, counted into that stage's F).
  DualPipeV's OVERLAP_F_B pairs are timed too, for the pair time the simulator needs, and inside
  a phase-split pair the time each chunk is parked while the other holds the turn.
- Pipeline communication: the runtime's ``_batch_p2p`` (posting isend/irecv) records, per
  message, the post time and its sequence number on the directed link; ``_wait_batch_p2p``
  records each wait. Posting itself is timed too and counts as exposed communication (gloo may
  write a send to the socket on the calling thread). Messages between two ranks match in posting
  order (FIFO per link and tag, as gloo and NCCL match them), so for every wait we know when the
  peer posted the other end of each message.
- Expert communication: every dispatch/combine all-to-all (``phases.CommRecorder``: issue time,
  completion from the work's future, and the wait), and the blocking exchange of the split sizes
  before each dispatch (``counts``). The i-th all-to-all of a rank matches the i-th of the other
  ranks of its EP group (collectives run in one order on every rank of a group).
- The split of a wait [a, b] on rank r: ``ready`` = the latest time the peer posted the matching
  send (for a receive: the data exists from then on) or the matching receive (for a send), or
  the last member of the EP group issued the all-to-all. The part of the wait before ``ready``
  is **bubble**: the peer had not produced (or not asked for) the data yet, a property of the
  schedule, of the stage times and of the skew between data ranks. The part after ``ready`` is
  **exposed communication**: the data was there to send and this rank waited for the transfer.
  Peer times come from the same clock: ranks on one host share CLOCK_MONOTONIC
  (``time.perf_counter``); on several hosts the offset is estimated by a timestamp ping-pong
  (error about half a round trip).
- Fractions of a rank's step time are assigned by priority: computing (compute spans less the
  times the rank was blocked on communication) = compute, else posting or a wait's transfer part
  = exposed comm, else a wait's waiting-for-peer part = bubble, else **other** (the runtime's own
  work between chunks: splitting the batch, schedule bookkeeping, Python). They sum to 1.
- ``comm_hidden_fraction`` of a rank: of the time at least one of its communications was in
  flight, the share during which it was computing. In flight: an all-to-all from ``ready`` to
  its completion; a pipeline message from ``ready`` to its completion, which is the end of its
  wait (gloo's send/recv works have no futures), a send's no later than the receiver's wait end.
  Computing: the union of the compute and pair spans less the blocked intervals (waits, posting,
  the split-size exchange). Per kind (a2a: dispatch/combine; counts; p2p) and together; the
  exposed seconds are in flight while blocked. ``--png`` draws the last profiled step of each
  case per rank (``mhc_train.bench.measured_timeline``).
- Transfer time of one stage message of the boundary shape [mb, S, n, C] is measured by a
  ping-pong between rank 0 and its next pipeline rank (minimum round trip / 2: the pure transfer
  time on idle ranks; the median is in the JSON), for the run's n and for n = 1, to show the mHC
  message-size effect (n = 4 sends 4x the bytes of the baseline).
- Simulator: the mean F, B (full; I + W where the schedule splits it), W and F&B pair times
  per stage, averaged over the stages, with the ping-pong time as the message time, go into
  ``mhc_train.parallel.simulator`` (overlap on, times per stage). It lays the same schedule out
  with perfectly balanced stages and no runtime overhead: its step time and idle fraction are
  what this runtime could reach, and measured / simulated shows how far it is. A second run with
  every stage at the slowest stage's times bounds what stage imbalance alone explains.

Caveats: on CPU the gloo transfer needs CPU time of both processes: its progress threads wait
for a time slice behind the compute threads (on 2 cores a 0.1 ms transfer sometimes takes
2-5 ms while the peer computes), so "exposed comm" includes that contention and the ping-pong
(taken on idle ranks) is a lower bound. A pipeline message's in-flight time ends at its wait, an
upper bound on gloo (a receive posted early and waited for late counts as in flight, hidden, in
between). Timing wrappers cost ~1 us per chunk. A single GPU cannot host two NCCL ranks, so
cross-device overlap cannot be measured there: use the simulator with measured chunk times. On
CUDA the timers are CUDA events on the current stream and the all-to-all times host times of
their futures (the CUDA path is not yet exercised on hardware in this repository's tests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.pipelining.schedules as torch_schedules

import mhc_train.parallel.pipeline.overlap as overlap_module
from mhc_train.bench.measured_timeline import Panel, RankRow, plot_measured
from mhc_train.bench.model_step import VARIANTS
from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.parallel import phases, simulator
from mhc_train.parallel.distributed import destroy_distributed, env_rank, init_distributed
from mhc_train.parallel.expert_parallel import apply_expert_parallel
from mhc_train.parallel.mesh import build_mesh, resolve_degrees
from mhc_train.parallel.pipeline import (
    PipelineConfigError,
    build_pipeline,
    normalize_schedule_name,
    resolve_stages_per_rank,
    validate_pipeline,
)
from mhc_train.residual import ResidualConfig

PROG = "mhc-train-bench-pipeline"
COMPUTE_KINDS = ("F", "B", "I", "W", "L")  # L: the last stage's loss, folded into its F
CATEGORIES = ("compute", "bubble", "exposed_comm", "other")
PRIORITY = ("compute", "exposed_comm", "bubble")  # who owns time where spans overlap (threads, streams)
COMM_KINDS = ("a2a", "counts", "p2p")  # expert all-to-all rows, its split-size exchange, pipeline messages
OVERLAP = {"on": "phases", "off": "sequential"}  # --overlap -> the dualpipev handler's concurrency
SIMULATED = {"1f1b": "1f1b", "zbv": "zbv", "dualpipev": "dualpipev"}  # torch schedule -> simulator's
PING_ROUNDS = 50


class BenchError(ValueError):
    """A bad argument or launch; printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------- clocks


class HostClock:
    """Marks are host times: right for CPU stages, where chunks run synchronously."""

    def start_step(self) -> None:
        pass

    def mark(self):
        return time.perf_counter()

    def resolve(self, mark) -> float:
        return mark


class CudaClock:
    """Marks are CUDA events on the current stream (device time, without synchronising the
    chunks), mapped to host time through a reference event recorded on an idle device."""

    def start_step(self) -> None:
        torch.cuda.synchronize()
        self.host0 = time.perf_counter()
        self.ref = torch.cuda.Event(enable_timing=True)
        self.ref.record()

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def resolve(self, mark) -> float:
        return self.host0 + self.ref.elapsed_time(mark) / 1e3  # after torch.cuda.synchronize()


# ------------------------------------------------------------------------------- recording


@dataclass
class Span:
    """kind: F B I W L (compute), pair (an F&B pair), parked (a pair's chunk waiting for its
    turn), post / wait (p2p posting / wait), counts (the blocking split-size all-to-all)."""

    kind: str
    start: object  # clock marks; floats (seconds) once resolved
    end: object
    stage: int = -1
    mb: int = -1
    detail: tuple = ()  # wait: ((peer, is_send, seq), ...) of the messages waited for; parked: (chunk,)


@dataclass
class Recorder:
    """Collects one rank's spans and message posts during a profiled step."""

    clock: object
    active: bool = False
    spans: list = field(default_factory=list)
    posts: dict = field(default_factory=dict)  # (peer, is_send, seq) -> mark when posted
    _seq: Counter = field(default_factory=Counter)
    _works: dict = field(default_factory=dict)  # id(work list) -> (work list, message keys)

    def begin(self) -> None:
        self.spans, self.posts, self._seq, self._works = [], {}, Counter(), {}
        self.comm = phases.CommRecorder()
        phases.set_comm_recorder(self.comm)
        self.clock.start_step()
        self.start = self.clock.mark()
        self.active = True

    def end(self) -> dict:
        self.active = False
        phases.set_comm_recorder(None)
        stop = self.clock.mark()
        if isinstance(self.clock, CudaClock):
            torch.cuda.synchronize()
        res = self.clock.resolve
        return {"start": res(self.start), "end": res(stop),
                "spans": [(s.kind, res(s.start), res(s.end), s.stage, s.mb, s.detail) for s in self.spans],
                "posts": {k: res(t) for k, t in self.posts.items()},
                "a2a": [(c.label, c.chunk, c.issued, c.completed, *(c.wait or (None, None)))  # host times,
                        for c in self.comm.records]}  # in issue order


RECORDER: Recorder | None = None
_orig_batch_p2p = torch_schedules._batch_p2p
_orig_wait = torch_schedules._wait_batch_p2p


def _batch_p2p(p2p_ops, desc=None):
    rec = RECORDER
    if rec is None or not rec.active or not p2p_ops:
        return _orig_batch_p2p(p2p_ops, desc)
    t = rec.clock.mark()  # the post time: a send's data exists from here on
    keys = []
    for op in p2p_ops:
        is_send = getattr(op.op, "__name__", "") == "isend"
        key = (op.peer, is_send, rec._seq[(op.peer, is_send)])
        rec._seq[(op.peer, is_send)] += 1
        rec.posts[key] = t
        keys.append(key)
    works = _orig_batch_p2p(p2p_ops, desc)
    # Posting is communication work on this thread (gloo may write a send to the socket here).
    rec.spans.append(Span("post", t, rec.clock.mark()))
    rec._works[id(works)] = (works, tuple(keys))  # keep the list alive: its id stays unique
    return works


def _wait_batch_p2p(work):
    rec = RECORDER
    if rec is None or not rec.active:
        return _orig_wait(work)
    start = rec.clock.mark()
    _orig_wait(work)
    keys = rec._works.pop(id(work), (None, ()))[1]
    rec.spans.append(Span("wait", start, rec.clock.mark(), detail=keys))


_orig_hand_over = phases.PairTurns.hand_over
_orig_all_to_all_single = dist.all_to_all_single


def _hand_over(self, chunk, label):
    """A phase-split pair's chunk parked while the other one holds the turn."""
    rec = RECORDER
    if rec is None or not rec.active:
        return _orig_hand_over(self, chunk, label)
    start = rec.clock.mark()
    _orig_hand_over(self, chunk, label)
    rec.spans.append(Span("parked", start, rec.clock.mark(), detail=(chunk,)))


def _all_to_all_single(*args, **kwargs):
    """The blocking all-to-all of the dispatch's split sizes, timed as communication the rank waits
    for (else its time would count as compute); the asynchronous ones go through ``wait_overlapped``."""
    rec = RECORDER
    if rec is None or not rec.active or _arg(args, kwargs, 5, "async_op", False):
        return _orig_all_to_all_single(*args, **kwargs)
    start = rec.clock.mark()
    try:
        return _orig_all_to_all_single(*args, **kwargs)
    finally:
        rec.spans.append(Span("counts", start, rec.clock.mark()))


def install_p2p_hooks() -> None:
    """Route the runtime's (and the overlap handler's) p2p calls, the pairs' turns and the
    blocking all-to-alls through the recorder; the callers look these functions up in their
    module (or class) at call time."""
    torch_schedules._batch_p2p = _batch_p2p
    torch_schedules._wait_batch_p2p = _wait_batch_p2p
    overlap_module._batch_p2p = _batch_p2p
    overlap_module._wait_batch_p2p = _wait_batch_p2p
    phases.PairTurns.hand_over = _hand_over
    dist.all_to_all_single = _all_to_all_single


def _timed(fn, describe):
    """``fn`` recorded as a Span(kind, stage, micro-batch) = describe(args, kwargs) while a step
    is profiled (describe -> None: not recorded)."""

    def wrapper(*args, **kwargs):
        rec = RECORDER
        what = describe(args, kwargs) if rec is not None and rec.active else None
        if what is None:
            return fn(*args, **kwargs)
        start = rec.clock.mark()
        try:
            return fn(*args, **kwargs)
        finally:
            rec.spans.append(Span(what[0], start, rec.clock.mark(), what[1], what[2]))

    return wrapper


def _arg(args, kwargs, index, name, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


def instrument(pipe) -> None:
    """Time this rank's stage chunks, the last stage's loss and DualPipeV's F&B pairs. Instance
    attributes shadow the methods, so the runtime and the overlap handler both go through them."""
    for stage in pipe.stages:
        i = stage.stage_index
        stage.forward_one_chunk = _timed(stage.forward_one_chunk,
                                         lambda a, k, i=i: ("F", i, _arg(a, k, 0, "fwd_chunk_id")))
        stage.backward_one_chunk = _timed(stage.backward_one_chunk, lambda a, k, i=i: (
            "B" if _arg(a, k, 2, "full_backward", True) else "I", i, _arg(a, k, 0, "bwd_chunk_id")))
        stage.backward_weight_one_chunk = _timed(stage.backward_weight_one_chunk,
                                                 lambda a, k, i=i: ("W", i, _arg(a, k, 0, "bwd_chunk_id")))
    sched = pipe.schedule
    # _maybe_compute_loss(stage, output, target_mbs, mb_index, loss_kwargs): a no-op but on the last stage
    sched._maybe_compute_loss = _timed(sched._maybe_compute_loss, lambda a, k: (
        ("L", a[0].stage_index, _arg(a, k, 3, "mb_index")) if a[0].is_last else None))
    functions = getattr(sched, "_comp_type_to_function_map", {})
    if torch_schedules.OVERLAP_F_B in functions:  # the overlap handler (dualpipev)
        functions[torch_schedules.OVERLAP_F_B] = _timed(functions[torch_schedules.OVERLAP_F_B],
                                                        lambda a, k: ("pair", -1, -1))


# ------------------------------------------------------------------------ measurements


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ping_pong(shapes, dtype, device, next_rank: int = 1, rounds: int = PING_ROUNDS) -> list[tuple[float, float]]:
    """One-way time of one message of each shape between rank 0 and ``next_rank`` (its next
    pipeline rank), as (min, median) of round trip / 2 over ``rounds``; the shapes alternate
    round by round so that bursts of load hit them alike. The minimum is the pure transfer time.
    The other ranks wait at a barrier; rank 0's figures are the ones reported."""
    rank, out = dist.get_rank(), [(0.0, 0.0)] * len(shapes)
    if rank in (0, next_rank):
        bufs, peer = [torch.zeros(s, dtype=dtype, device=device) for s in shapes], next_rank if rank == 0 else 0
        times: list[list[float]] = [[] for _ in shapes]
        for i in range(rounds + 5):  # 5 untimed rounds: connection set-up, allocation
            for buf, t in zip(bufs, times):
                _sync(device)
                start = time.perf_counter()
                if rank == 0:
                    dist.send(buf, peer)
                    dist.recv(buf, peer)
                else:
                    dist.recv(buf, peer)
                    dist.send(buf, peer)
                _sync(device)
                if i >= 5:
                    t.append(time.perf_counter() - start)
        out = [(min(t) / 2, statistics.median(t) / 2) for t in times]
    dist.barrier()
    return out


def clock_offsets(device) -> list[float]:
    """Each rank's clock minus rank 0's. On one host time.perf_counter is CLOCK_MONOTONIC, shared
    by all processes: 0. Across hosts: the min-round-trip estimate of a timestamp ping-pong."""
    world, rank = dist.get_world_size(), dist.get_rank()
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    offsets = [0.0] * world
    if len(set(hosts)) == 1:
        return offsets
    buf = torch.zeros(1, dtype=torch.float64, device=device)
    for r in range(1, world):
        best = (float("inf"), 0.0)
        for _ in range(10):
            if rank == 0:
                t0 = time.perf_counter()
                dist.send(buf, r)
                dist.recv(buf, r)
                remote = buf.item()  # synchronises on CUDA
                t2 = time.perf_counter()
                best = min(best, (t2 - t0, remote - (t0 + t2) / 2))
            elif rank == r:
                dist.recv(buf, 0)
                _sync(device)
                buf.fill_(time.perf_counter())
                dist.send(buf, 0)
        offsets[r] = best[1]
    dist.barrier()
    return offsets


@dataclass
class Case:
    residual: str
    schedule: str
    overlap: str | None  # dualpipev: on / off (OVERLAP); other schedules have no pairs: None
    pipe: object
    n: int

    @property
    def key(self) -> tuple:
        return (self.residual, self.schedule, self.overlap)


def case_label(key: tuple) -> str:
    residual, schedule, overlap = key
    return f"{residual} {schedule}" + (f" overlap {overlap}" if overlap else "")


def run_step(case: Case, tokens, targets, record: bool):
    for p in case.pipe.parameters():  # as zero_grad(set_to_none=True) before a training step
        p.grad = None
    dist.barrier()  # every rank starts the step together: the step is the schedule's makespan
    if record:
        RECORDER.begin()
    case.pipe.step(tokens, targets)
    return RECORDER.end() if record else None


# ---------------------------------------------------------------------------- analysis
# Intervals are (start, end) pairs; "merged" lists are sorted and disjoint.


def _merge(intervals) -> list[tuple[float, float]]:
    out: list = []
    for s, e in sorted(intervals):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _length(merged) -> float:
    return sum(e - s for s, e in merged)


def _intersect(a, b) -> list:
    """Of two merged lists."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _subtract(a, b) -> list:
    """``a`` less ``b``, both merged."""
    out, j = [], 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > s:
                out.append((s, b[k][0]))
            s = max(s, b[k][1])
            k += 1
        if s < e:
            out.append((s, e))
    return out


def categorize(segments, start: float, end: float) -> dict[str, float]:
    """Seconds of [start, end] per category; overlapping segments go to the first of
    compute > exposed_comm > bubble, uncovered time to other."""
    cuts = sorted({start, end, *(x for s, e, _ in segments for x in (s, e) if start < x < end)})
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for lo, hi in zip(cuts, cuts[1:]):
        mid = (lo + hi) / 2
        here = {c for s, e, c in segments if s <= mid < e}
        totals[next((c for c in PRIORITY if c in here), "other")] += hi - lo
    return totals


def _every(by_kind: dict) -> list:
    return [iv for intervals in by_kind.values() for iv in intervals]


def comm_overlap(compute, blocked: dict, in_flight: dict, exposed: dict | None = None) -> dict[str, dict[str, float]]:
    """Per kind of communication (the keys of ``in_flight``; ``all``: every kind together):
    seconds in flight, in flight while the rank was computing (``hidden``; computing = compute
    less ``blocked`` on any kind) and in flight while the rank waited for that kind's transfer
    (``exposed``: per kind, the parts of its waits after everything waited for was posted; by
    default the whole ``blocked``). The rest of the in-flight time the rank was doing neither:
    waiting for a peer, or for another transfer, or runtime work between chunks."""
    exposed = blocked if exposed is None else exposed
    computing = _subtract(_merge(compute), _merge(_every(blocked)))
    out = {}
    for kind, intervals, waits in [*((k, v, exposed.get(k, ())) for k, v in in_flight.items()),
                                   ("all", _every(in_flight), _every(exposed))]:
        flight = _merge(intervals)
        out[kind] = {"in_flight_s": _length(flight), "hidden_s": _length(_intersect(flight, computing)),
                     "exposed_s": _length(_intersect(flight, _merge(waits)))}
    return out


def hidden_fraction(seconds: dict) -> float | None:
    return seconds["hidden_s"] / seconds["in_flight_s"] if seconds["in_flight_s"] > 0 else None


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


@dataclass
class RankStep:
    """One rank's profiled step on rank 0's clock, in the analysis' terms."""

    start: float
    end: float
    spans: list  # (kind, start, end, stage, mb, detail)
    segments: list  # (start, end, category), for categorize
    compute: list  # compute and pair spans
    blocked: dict  # COMM_KINDS -> intervals: waits, posting (p2p), the split-size exchange (counts)
    exposed: dict  # COMM_KINDS -> the blocked intervals after everything waited for was posted
    in_flight: dict  # COMM_KINDS -> intervals


def _shift(part: dict, o: float) -> dict:
    def t(x):
        return None if x is None else x - o

    return {"start": part["start"] - o, "end": part["end"] - o,
            "spans": [(k, s - o, e - o, *rest) for k, s, e, *rest in part["spans"]],
            "posts": {key: x - o for key, x in part["posts"].items()},
            "a2a": [(label, chunk, *map(t, times)) for label, chunk, *times in part.get("a2a", ())]}


def step_view(parts: list[dict], offsets: list[float], ep_groups: list[list[int]] | None = None) -> list[RankStep]:
    """Per rank of one step; ``ep_groups[r]``: the ranks of r's expert-parallel group (r alone by
    default). A pipeline message or collective is ``ready`` once every end of it was posted."""
    shifted = [_shift(p, o) for p, o in zip(parts, offsets)]
    # end of the wait that covered each message (gloo's p2p works have no futures)
    done = [{key: e for kind, _, e, *_, keys in p["spans"] if kind == "wait" for key in keys} for p in shifted]
    counts = [[(s, e) for kind, s, e, *_ in p["spans"] if kind == "counts"] for p in shifted]
    views = []
    for r, part in enumerate(shifted):
        group = ep_groups[r] if ep_groups else [r]
        segments = []
        blocked, exposed, flight = ({k: [] for k in COMM_KINDS} for _ in range(3))

        def peer_post(key):
            peer, is_send, seq = key
            return shifted[peer]["posts"].get((r, not is_send, seq)) if peer < len(shifted) else None

        def waited(comm, s, e, ready):  # before ready: waiting for a peer (bubble); after: for the transfer
            cut = min(max(ready, s), e)
            segments.extend([(s, cut, "bubble"), (cut, e, "exposed_comm")])
            blocked[comm].append((s, e))
            exposed[comm].append((cut, e))

        for kind, s, e, _stage, _mb, detail in part["spans"]:
            if kind == "wait":
                waited("p2p", s, e, max([s, *(t for t in map(peer_post, detail) if t is not None)]))
            elif kind == "post":
                waited("p2p", s, e, s)
        for key, posted in part["posts"].items():
            peer, is_send, seq = key
            other = peer_post(key)
            end = done[r].get(key, part["end"])
            if is_send and other is not None:  # sent once the receiver has it
                end = min(end, done[peer].get((r, False, seq), end))
            flight["p2p"].append((posted if other is None else max(posted, other), end))
        mine, same = part["a2a"], all(len(shifted[q]["a2a"]) == len(part["a2a"]) for q in group)
        for i, (_label, _chunk, issued, completed, wait_s, wait_e) in enumerate(mine):
            ready = max(shifted[q]["a2a"][i][2] for q in group) if same else issued
            ends = [t for t in (completed, wait_e) if t is not None]
            flight["a2a"].append((ready, min(ends) if ends else part["end"]))
            if wait_s is not None:
                waited("a2a", wait_s, wait_e, ready)
        same = all(len(counts[q]) == len(counts[r]) for q in group)
        for i, (s, e) in enumerate(counts[r]):
            ready = max(counts[q][i][0] for q in group) if same else s
            flight["counts"].append((ready, e))
            waited("counts", s, e, ready)
        compute = [(s, e) for kind, s, e, *_ in part["spans"] if kind in COMPUTE_KINDS or kind == "pair"]
        segments += [(s, e, "compute") for s, e in _subtract(_merge(compute), _merge(_every(blocked)))]
        views.append(RankStep(part["start"], part["end"], part["spans"], segments, compute, blocked, exposed, flight))
    return views


def step_segments(parts: list[dict], offsets: list[float]) -> list[tuple[float, float, list]]:
    """Per rank of one step: (start, end, [(start, end, category), ...]) on rank 0's clock."""
    return [(v.start, v.end, v.segments) for v in step_view(parts, offsets)]


def _chunk(kind: str) -> str:
    """The chunk of a pair a compute span runs in: the loss in the forward's."""
    return "F" if kind in ("F", "L") else "B"


def _running(spans: list) -> dict[tuple, list]:
    """Per compute span (its kind, start, end, stage, mb): the intervals it ran, less the time it
    was parked in a phase-split pair while the other chunk held the turn."""
    parked = {c: _merge([(s, e) for k, s, e, *_, d in spans if k == "parked" and d == (c,)]) for c in "FB"}
    return {(k, s, e, stage, mb): _subtract([(s, e)], parked[_chunk(k)])
            for k, s, e, stage, mb, _ in spans if k in COMPUTE_KINDS}


def chunk_times(steps: list[list[dict]]) -> tuple[dict, list[float]]:
    """Durations per (kind, stage), the last stage's loss folded into its forward, less the time
    parked in a pair; and the compute time inside each F&B pair. Also, per (kind + "_a2a", stage)
    and (kind + "_blocked", stage): the expert all-to-all in flight issued by each chunk (issue to
    completion, the split-size exchange included) and the time the chunk was blocked waiting on
    it - what the simulator's a2a_f / a2a_b and compute-only F / B are made of."""
    chunks: dict = defaultdict(list)
    pairs = []
    for parts in steps:
        for part in parts:
            running = {key: _length(ivs) for key, ivs in _running(part["spans"]).items()}
            loss = defaultdict(float)
            for (kind, s, e, stage, mb), t in running.items():
                if kind == "L":
                    loss[(stage, mb)] += t
            compute = [(s, e) for kind, s, e, *_ in part["spans"] if kind in COMPUTE_KINDS]
            counts = [(s, e) for kind, s, e, *_ in part["spans"] if kind == "counts"]
            for kind, s, e, stage, mb, _ in part["spans"]:
                if kind in ("F", "B", "I", "W"):
                    chunks[(kind, stage)].append(running[(kind, s, e, stage, mb)] +
                                                 (loss.get((stage, mb), 0.0) if kind == "F" else 0.0))
                    own = [r for r in part.get("a2a", ()) if s <= r[2] <= e and r[1] == _chunk(kind)]
                    flight = sum(((r[3] if r[3] is not None else r[5] or r[2]) - r[2]) for r in own)
                    blocked = sum(r[5] - r[4] for r in own if r[4] is not None)
                    exchange = [(a, b) for a, b in counts if s <= a <= e]
                    chunks[(kind + "_a2a", stage)].append(flight + _length(exchange))
                    chunks[(kind + "_blocked", stage)].append(blocked + _length(exchange))
                elif kind == "pair":
                    pairs.append(_length(_merge([(max(a, s), min(b, e)) for a, b in compute if a < e and b > s])))
    return chunks, pairs


def per_stage(chunks: dict, kind: str, over_stages=statistics.mean) -> float | None:
    """Mean over micro-batches and steps per stage (so that the simulated compute is the measured
    compute, slow outliers included), then reduced over the stages (mean, or max: the slowest)."""
    means = [statistics.mean(v) for (k, _), v in chunks.items() if k == kind]
    return over_stages(means) if means else None


def sim_times(chunks: dict, pairs: list, message_s: float, over_stages=statistics.mean) -> simulator.Times:
    """The simulator's inputs from the measurement: F / B / W are compute only (a chunk's time less
    its blocked all-to-all waits), a2a_f / a2a_b the all-to-all in flight per chunk (exposed when
    the simulator runs the chunk alone, hidden inside a pair), the pair time the measured one."""
    def compute(kind):
        total, blocked = per_stage(chunks, kind, over_stages), per_stage(chunks, kind + "_blocked", over_stages)
        return None if total is None else max(total - (blocked or 0.0), 1e-9)

    f, b, i, w = (compute(k) for k in ("F", "B", "I", "W"))
    a2a_f = per_stage(chunks, "F_a2a", over_stages) or 0.0
    a2a_b = per_stage(chunks, "B_a2a", over_stages) or per_stage(chunks, "I_a2a", over_stages) or 0.0
    if b is None:  # a split backward only (zbv): its full backward is I + W
        b = (i or 0.0) + (w or 0.0)
    w = min(w or 0.0, b)
    fb = over_stages(pairs) if pairs else None  # no pairs measured: the simulator's own model
    return simulator.Times(F=f, B=b, W=w, fb=fb, a2a_f=a2a_f, a2a_b=a2a_b, comm=message_s, n=1.0)


def simulated(schedule: str, ranks: int, microbatches: int, chunks: dict, pairs: list, message_s: float,
              message_s_n1: float) -> dict | None:
    """The simulator's layout of this schedule with the measured chunk times: every stage at the
    stage mean (balanced stages), at the slowest stage's times, and with n = 1-size messages."""
    if schedule not in SIMULATED:
        return None

    def run(times):
        return simulator.evaluate(SIMULATED[schedule], ranks, microbatches, times, overlap="on", per="stage")

    times = sim_times(chunks, pairs, message_s)
    res = run(times)
    # the other V schedule on the same measured times (its pairs, if any, at the simulator's own
    # pair model, a measured pair of this one otherwise): which would have been faster
    other = {"zbv": "dualpipev", "dualpipev": "zbv"}.get(schedule)
    alternative = None
    if other is not None:
        alt_times = times if other == "dualpipev" and pairs else replace(times, fb=None)
        alternative = {"schedule": other, "step_s": simulator.evaluate(
            SIMULATED[other], ranks, microbatches, alt_times, overlap="on", per="stage").makespan}
    slowest = run(sim_times(chunks, pairs, message_s, max))
    res_n1 = run(replace(times, comm=message_s_n1))
    return {"step_s": res.makespan, "idle_fraction": res.bubble_fraction,
            "rank_idle_fraction": [x / res.makespan for x in res.idle], "exposed_comm_s": res.exposed_comm,
            "step_s_slowest_stage": slowest.makespan, "step_s_n1_messages": res_n1.makespan,
            "alternative": alternative,
            "times_s": {"F": times.F, "B": times.B, "W": times.W, "FB": times.fb, "a2a_f": times.a2a_f,
                        "a2a_b": times.a2a_b, "message": message_s}}


def _add_comm(total: dict, seconds: dict) -> None:
    for kind, values in seconds.items():
        acc = total.setdefault(kind, dict.fromkeys(values, 0.0))
        for k, v in values.items():
            acc[k] += v


def _comm_report(total: dict, steps: int) -> dict:
    """Seconds per step and the hidden fraction, per kind."""
    return {kind: {**{k: v / steps for k, v in values.items()}, "hidden_fraction": hidden_fraction(values)}
            for kind, values in total.items()}


def analyse(case_key, steps: list[list[dict]], offsets, tokens: int, roles: list[tuple[int, int]], microbatches: int,
            message: dict) -> tuple[dict, list[RankStep]]:
    """``roles[r]``: (pipeline rank, data rank) of rank r; ``tokens``: per step, all data ranks."""
    world, pp = len(roles), 1 + max(p for p, _ in roles)
    ep_groups = [[q for q in range(world) if roles[q][0] == roles[r][0]] for r in range(world)]
    per_rank = [{"steps": [], "totals": dict.fromkeys(CATEGORIES, 0.0), "comm": {}} for _ in range(world)]
    makespans, last = [], None
    for parts in steps:
        views = step_view(parts, offsets, ep_groups)
        makespans.append(max(v.end for v in views) - min(v.start for v in views))
        for r, v in enumerate(views):
            per_rank[r]["steps"].append(v.end - v.start)
            for c, x in categorize(v.segments, v.start, v.end).items():
                per_rank[r]["totals"][c] += x
            _add_comm(per_rank[r]["comm"], comm_overlap(v.compute, v.blocked, v.in_flight, v.exposed))
        last = views
    chunks, pairs = chunk_times(steps)
    sim = simulated(case_key[1], pp, microbatches, chunks, pairs, message["one_way_s"], message["one_way_s_n1"])
    rows, comm_all = [], {}
    for r, data in enumerate(per_rank):
        step = statistics.median(data["steps"])
        total = sum(data["steps"])
        _add_comm(comm_all, data["comm"])
        comm = _comm_report(data["comm"], len(steps))
        rows.append({"rank": r, "pp_rank": roles[r][0], "dp_rank": roles[r][1], "step_s": step,
                     "tokens_per_s": tokens / step, "fractions": {c: v / total for c, v in data["totals"].items()},
                     "seconds_per_step": {c: v / len(data["steps"]) for c, v in data["totals"].items()},
                     "comm_hidden_fraction": comm["all"]["hidden_fraction"], "comm": comm})
    all_total = sum(sum(d["steps"]) for d in per_rank)
    overall_step = statistics.median(makespans)
    comm = _comm_report(comm_all, len(steps) * world)  # per rank and step
    overall = {"step_s": overall_step, "tokens_per_s": tokens / overall_step,
               "fractions": {c: sum(d["totals"][c] for d in per_rank) / all_total for c in CATEGORIES},
               "comm_hidden_fraction": comm["all"]["hidden_fraction"], "comm": comm}
    chunk_s = {k: per_stage(chunks, k) for k in ("F", "B", "I", "W", "F_a2a", "B_a2a", "I_a2a", "F_blocked", "B_blocked")}
    chunk_s["FB"] = statistics.mean(pairs) if pairs else None
    return ({"residual": case_key[0], "schedule": case_key[1], "overlap": case_key[2], "ranks": rows,
             "overall": overall, "chunk_s": chunk_s, "simulated": sim, "steps": len(steps)}, last)


def timeline_panel(title: str, views: list[RankStep], roles: list[tuple[int, int]]) -> Panel:
    """One profiled step as ``measured_timeline`` draws it: times from the step's start."""
    t0, pp = min(v.start for v in views), 1 + max(p for p, _ in roles)
    rows, comm = [], {}

    def at(intervals):
        return [(s - t0, e - t0) for s, e in intervals]

    for r, v in enumerate(views):
        pairs = _merge([(s, e) for k, s, e, *_ in v.spans if k == "pair"])
        bars = []
        for (kind, s, e, stage, mb), running in _running(v.spans).items():
            in_pair = kind != "W" and _intersect([(s, e)], pairs)
            half = ("top" if _chunk(kind) == "F" else "bottom") if in_pair else "full"
            for a, b in at(running):  # the loss drawn as part of its forward
                bars.append(("F" if kind == "L" else kind, a, b, min(stage // pp, 1), -1 if kind == "L" else mb, half))
        exposed = {k: _intersect(_merge(v.in_flight[k]), _merge(v.exposed[k])) for k in COMM_KINDS}
        drawn = {"a2a": ("a2a", "counts"), "p2p": ("p2p",)}  # the split sizes are part of the all-to-all
        label = f"rank {r}" + (f"\npp {roles[r][0]} · ep {roles[r][1]}" if pp < len(roles) else "")
        rows.append(RankRow(label, bars, at(pairs),
                            at(_merge(_every(v.blocked))),
                            {d: at(_merge([iv for k in ks for iv in v.in_flight[k]])) for d, ks in drawn.items()},
                            {d: at(_merge([iv for k in ks for iv in exposed[k]])) for d, ks in drawn.items()}))
        _add_comm(comm, comm_overlap(v.compute, v.blocked, v.in_flight, v.exposed))
    step = max(v.end for v in views) - t0
    kinds = ", ".join(f"{name} {_pct(hidden_fraction(comm[k]))} ({comm[k]['exposed_s'] / len(views) * 1e3:.1f} ms "
                      "exposed per rank)"
                      for k, name in (("a2a", "all-to-all"), ("counts", "split sizes"), ("p2p", "pipeline"))
                      if comm[k]["in_flight_s"] > 0)
    panel = Panel(f"{title}: step {step * 1e3:.1f} ms\ncommunication hidden behind compute "
                  f"{_pct(hidden_fraction(comm['all']))}: {kinds}", step, rows)
    if rows[0].pairs:  # magnify rank 0's middle pair, where the chunks take turns
        i = len(rows[0].pairs) // 2
        s, e = rows[0].pairs[i]
        panel.zoom = (s - 0.02 * (e - s), e + 0.02 * (e - s))
        panel.zoom_title = f"rank 0's F&B pair {i + 1} of {len(rows[0].pairs)}, magnified"
    return panel


# ------------------------------------------------------------------------------ report


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.3g}"


def table(header: str, messages: dict, results: list[dict]) -> str:
    head = ["residual", "schedule", "overlap", "rank", "step ms", "tokens/s", "compute", "bubble", "exp.comm", "other",
            "hidden", "hid a2a/cnt/p2p", "exp a2a/cnt/p2p ms", "F/B/I/W/F&B ms", "sim step ms", "sim slowest",
            "sim idle", "meas/sim"]
    rows = []
    for res in results:
        sim = res["simulated"] or {}
        for row in res["ranks"] + [dict(res["overall"], rank="all")]:
            overall = row["rank"] == "all"
            fr, comm = row["fractions"], row["comm"]
            rank_idle = sim.get("rank_idle_fraction")
            idle = sim.get("idle_fraction") if overall else (rank_idle[row["pp_rank"]] if rank_idle else None)
            rows.append([res["residual"], res["schedule"], res["overlap"] or "-", str(row["rank"]),
                         f"{row['step_s'] * 1e3:.1f}", f"{row['tokens_per_s']:.0f}",
                         *(f"{100 * fr[c]:.1f}%" for c in CATEGORIES), _pct(row["comm_hidden_fraction"]),
                         "/".join(_pct(comm[k]["hidden_fraction"]) for k in COMM_KINDS),
                         "/".join(f"{comm[k]['exposed_s'] * 1e3:.1f}" for k in COMM_KINDS),
                         "/".join(_ms(res["chunk_s"][k]) for k in ("F", "B", "I", "W", "FB")) if overall else "",
                         (f"{sim['step_s'] * 1e3:.1f}" if overall else "") if sim else "-",
                         (f"{sim['step_s_slowest_stage'] * 1e3:.1f}" if overall else "") if sim else "-",
                         "-" if idle is None else f"{100 * idle:.1f}%",
                         f"{row['step_s'] / sim['step_s']:.2f}x" if sim and overall else ""])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = [header]
    for name, m in messages.items():
        n1 = f"; n=1: {m['bytes_n1'] / 1024:.1f} KiB, {m['one_way_s_n1'] * 1e3:.3f} ms" if m["n"] > 1 else ""
        lines.append(f"stage message {name}: {m['shape']} {m['dtype']} = {m['bytes'] / 1024:.1f} KiB, one-way "
                     f"{m['one_way_s'] * 1e3:.3f} ms (ping-pong min; median {m['one_way_median_s'] * 1e3:.3f} ms){n1}")
    lines += ["  ".join(h.rjust(w) if i > 3 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths))),
              "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i > 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    effects = [f"{r['schedule']} {100 * (r['simulated']['step_s'] / r['simulated']['step_s_n1_messages'] - 1):+.2f}%"
               for r in results if r["simulated"] and messages[r["residual"]]["n"] > 1]
    if effects:
        lines.append("simulated step with n-stream messages vs n=1-size messages: " + ", ".join(effects))
    lines.append("bubble: waiting for data the peer had not posted yet (or for an EP peer to issue its all-to-all); "
                 "exp.comm: posting messages, and waiting after the peer had posted (transfer not hidden); other: "
                 "runtime work between chunks.")
    lines.append("hidden: comm_hidden_fraction, the share of the time a communication was in flight during which "
                 "the rank computed; per kind: a2a = expert dispatch/combine all-to-all, cnt = its blocking split-size "
                 "exchange, p2p = pipeline messages; exp: in flight while the rank was blocked, ms per step; all: the "
                 "ranks together.")
    lines.append("sim: the simulator on the measured chunk times (mean per stage, averaged over the stages: "
                 "balanced stages, no runtime overhead) and the ping-pong message time; sim slowest: every stage at "
                 "the slowest stage's times; sim idle compares with bubble + exp.comm + other; meas/sim: step over "
                 "sim step.")
    return "\n".join(lines)


def chrome_trace(timelines: dict[str, list[RankStep]]) -> dict:
    """The last profiled step of each case as a Chrome/Perfetto trace (one process per case)."""
    events = []
    for pid, (label, views) in enumerate(timelines.items()):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": label}})
        t0 = min(v.start for v in views)
        for rank, (start, end, segments) in enumerate((v.start, v.end, v.segments) for v in views):
            events.append({"name": "step", "ph": "X", "pid": pid, "tid": rank, "ts": (start - t0) * 1e6,
                           "dur": (end - start) * 1e6})
            for s, e, cat in segments:
                if e > s:
                    events.append({"name": cat, "ph": "X", "pid": pid, "tid": rank, "ts": (s - t0) * 1e6,
                                   "dur": (e - s) * 1e6})
    return {"traceEvents": events}


# -------------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line (argparse would print the usage too), exit 2
        raise BenchError(message)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description="Profile pipeline steps per schedule and residual variant: tokens/s, "
                "compute / bubble / exposed communication / other per rank, the share of communication hidden "
                "behind compute, beside the simulator's ideal.",
                epilog="Run under torchrun with >= 2 ranks, e.g. python -m torch.distributed.run --standalone "
                       "--nproc_per_node=2 -m mhc_train.bench.pipeline_profile --model tiny")
    p.add_argument("--model", default="small", help="configs/model/<name>.yaml [small]")
    p.add_argument("--layers", type=int, help="override model.n_layers (default: the model's, raised to the "
                                              "number of stages when it has fewer blocks)")
    p.add_argument("--residual", nargs="+", default=["baseline", "mhc"], choices=sorted(VARIANTS))
    p.add_argument("--schedule", nargs="+", default=["1f1b", "zbv", "dualpipev"])
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--balance", choices=("stage", "rank"), default="stage",
                   help="stage cut for the V schedules: per stage or per rank (1f1b always per stage)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step and data rank, split into the "
                                                        "micro-batches")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="profiled steps per case")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="CPU threads per rank (default: torch's; torchrun sets 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree: the world is (world / ep) pipeline "
                   "ranks x ep data ranks, each data rank its own pipeline and batch, routed experts sharded over "
                   "ep [1]")
    p.add_argument("--overlap", nargs="+", choices=tuple(OVERLAP), default=["on"],
                   help="dualpipev's F&B pairs: on = phase-split (the chunks take turns at each communication), "
                        "off = in the runtime's order; each is a case [on]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report as JSON")
    p.add_argument("--trace", help="write the last profiled step of each case as a Chrome trace (JSON)")
    p.add_argument("--png", help="draw the last profiled step of each case per rank (compute, communication in "
                                 "flight, blocked waits) as a PNG")
    args = p.parse_args(argv)
    args.overlap = list(dict.fromkeys(args.overlap))
    for name in ("microbatches", "batch", "seq", "steps", "ep"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise BenchError("--warmup must be >= 0 and --threads >= 1")
    return args


def plan(args, world: int):
    """Everything checkable before the process group exists (so every rank fails alike)."""
    schedules = list(dict.fromkeys(normalize_schedule_name(s) for s in args.schedule))
    if world % args.ep:
        raise BenchError(f"--ep {args.ep} must divide the world of {world} ranks (pipeline ranks x ep)")
    pp = world // args.ep
    if pp < 2:
        raise BenchError(f"needs >= 2 pipeline ranks: the world of {world} ranks / --ep {args.ep} = {pp}")
    cfg = load_model_config(args.model)
    stages = max(pp * resolve_stages_per_rank(s, None) for s in schedules)
    layers = args.layers or max(cfg.n_layers, stages)
    cfg = load_model_config(args.model, n_layers=layers)
    if args.seq > cfg.max_seq_len:
        raise BenchError(f"--seq {args.seq} exceeds model.max_seq_len {cfg.max_seq_len}")
    degrees = resolve_degrees(world, pp=pp, dp_shard=args.ep, ep=args.ep, n_routed_experts=cfg.n_routed_experts,
                              has_moe=cfg.n_layers > cfg.n_dense_layers)
    for s in schedules:
        validate_pipeline(s, pp, layers, args.microbatches, batch_size=args.batch)
    return schedules, cfg, degrees


def run(args, schedules, cfg, degrees) -> tuple[str, dict, dict]:
    global RECORDER
    rank, world = dist.get_rank(), degrees.world
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    mesh = build_mesh(degrees, device.type)
    roles = [None] * world
    dist.all_gather_object(roles, (mesh.pp_rank, mesh.dp_rank))
    RECORDER = Recorder(CudaClock() if device.type == "cuda" else HostClock())
    install_p2p_hooks()
    mb = args.batch // args.microbatches
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1),  # each data rank its own batch
                         generator=torch.Generator().manual_seed(args.seed + 1 + mesh.dp_rank)).to(device)
    tokens, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    cases = []
    for residual in args.residual:
        for schedule in schedules:
            for overlap in args.overlap if schedule == "dualpipev" else [None]:
                torch.manual_seed(args.seed)  # the same model on every rank
                model = MHCTransformer(cfg, ResidualConfig(**VARIANTS[residual])).to(device).train()
                balance = args.balance if schedule in ("zbv", "dualpipev") else "stage"
                pipe = build_pipeline(model, schedule, args.microbatches, mesh.pp_rank, degrees.pp,
                                      microbatch_size=mb, seq_len=args.seq, device=device, balance=balance,
                                      group=mesh.group("pp"), overlap_concurrency=OVERLAP[overlap or "on"])
                if degrees.ep > 1:
                    apply_expert_parallel([b.ffn for m in pipe.modules for b in m.blocks.values() if b.is_moe],
                                          mesh.ep_mesh())
                instrument(pipe)
                cases.append(Case(residual, schedule, overlap, pipe, model.n_streams))
    dtype = next(cases[0].pipe.parameters()).dtype
    size = torch.empty((), dtype=dtype).element_size() * mb * args.seq * cfg.dim  # one stream
    ns = sorted({c.n for c in cases} | {1})
    # after every build, so that the ranks are idle and in step
    next_rank = roles.index((1, roles[0][1]))
    measured = dict(zip(ns, ping_pong([[mb, args.seq, n, cfg.dim] for n in ns], dtype, device, next_rank)))
    messages = {}
    for residual in args.residual:
        n = next(c.n for c in cases if c.residual == residual)
        messages[residual] = {"n": n, "shape": [mb, args.seq, n, cfg.dim], "dtype": str(dtype).replace("torch.", ""),
                              "bytes": size * n, "one_way_s": measured[n][0], "one_way_median_s": measured[n][1],
                              "bytes_n1": size, "one_way_s_n1": measured[1][0]}
    offsets = clock_offsets(device)

    for case in cases:
        for _ in range(args.warmup):
            run_step(case, tokens, targets, record=False)
    records = {c.key: [] for c in cases}
    for _ in range(args.steps):  # interleaved rounds: noise hits every case alike
        for case in cases:
            records[case.key].append(run_step(case, tokens, targets, record=True))

    gathered = [None] * world if rank == 0 else None
    dist.gather_object(records, gathered, dst=0)
    if rank != 0:
        return "", {}, {}
    results, timelines = [], {}
    for key in records:
        steps = [[gathered[r][key][i] for r in range(world)] for i in range(args.steps)]
        result, last = analyse(key, steps, offsets, args.batch * args.seq * degrees.ep, roles, args.microbatches,
                               messages[key[0]])
        result["stage_blocks"] = next(c.pipe.stage_blocks for c in cases if c.key == key)
        results.append(result)
        timelines[case_label(key)] = last
    dev = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU ({platform.processor() or platform.machine()})")
    config = {"model": args.model, "layers": cfg.n_layers, "batch": args.batch, "microbatches": args.microbatches,
              "microbatch_size": mb, "seq": args.seq, "ranks": world, "pp": degrees.pp, "ep": degrees.ep,
              "rank_roles": [{"pp_rank": p, "dp_rank": d} for p, d in roles], "steps": args.steps,
              "warmup": args.warmup, "threads_per_rank": torch.get_num_threads(), "device": dev,
              "backend": dist.get_backend(), "torch": torch.__version__, "residuals": args.residual,
              "schedules": schedules, "overlap": args.overlap, "balance": args.balance}
    layout = "" if degrees.ep == 1 else (
        f" (pp={degrees.pp} x ep={degrees.ep}; rank -> (pp, ep): " + " ".join(f"{r}->{p},{d}" for r, (p, d) in
                                                                          enumerate(roles)) + ")")
    header = (f"model={args.model} ({cfg.n_layers} blocks) batch={args.batch} per data rank ({args.microbatches} "
              f"micro-batches of {mb}) seq={args.seq} ranks={world}{layout} steps={args.steps} after {args.warmup} "
              f"warm-up, device={dev}, {torch.get_num_threads()} threads/rank, {dist.get_backend()}, "
              f"torch={torch.__version__}, V cut per {args.balance}")
    report = {"config": config, "messages": messages, "cases": results}
    if args.png:
        scale = f"pp={degrees.pp} x ep={degrees.ep} ({world} ranks)" if degrees.ep > 1 else f"{world} ranks"
        plot_measured([timeline_panel(f"{label}, {scale}, {args.microbatches} micro-batches", views, roles)
                       for label, views in timelines.items()], args.png,
                      f"Measured pipeline step (last profiled step of each case): model={args.model}, "
                      f"{cfg.n_layers} blocks, {mb} x {args.seq} tokens per micro-batch, {dev}, "
                      f"{dist.get_backend()}")
    return table(header, messages, results), report, timelines


def main(argv: list[str] | None = None) -> int:
    rank = env_rank()
    try:
        args = parse_args(argv)
        world = int(os.environ.get("WORLD_SIZE", "0") or 0)
        if world < 2:
            raise BenchError("needs torchrun with >= 2 ranks (one pipeline rank per process), e.g. python -m "
                             "torch.distributed.run --standalone --nproc_per_node=2 -m mhc_train.bench.pipeline_profile"
                             + ("" if "WORLD_SIZE" in os.environ else "; WORLD_SIZE is not set"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
        if args.device == "cuda" and torch.cuda.device_count() < local:
            raise BenchError(f"--device cuda needs one GPU per rank: {local} ranks on this host, "
                             f"{torch.cuda.device_count()} GPUs (NCCL cannot put two ranks on one GPU; on one GPU, "
                             "time the chunks with mhc-train-bench and lay the schedule out with mhc-train-simulate)")
        schedules, cfg, degrees = plan(args, world)
    except (BenchError, PipelineConfigError, ValueError) as e:  # MeshConfigError is a ValueError
        if rank == 0:  # every rank fails alike; one message is enough
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed(device_type=args.device)
    try:
        text, report, timelines = run(args, schedules, cfg, degrees)
    finally:
        destroy_distributed()
    if rank == 0:
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
            print(f"wrote {args.json}")
        if args.trace:
            Path(args.trace).write_text(json.dumps(chrome_trace(timelines)))
            print(f"wrote {args.trace}")
        if args.png:
            print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
