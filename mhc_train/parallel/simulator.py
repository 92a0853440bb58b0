"""Pipeline schedule simulator: step time, bubble, activation memory and exposed communication of
1F1B, ZB1P (ZB-H1), ZB-V, DualPipe and DualPipeV, with and without overlap.

    python -m mhc_train.parallel.simulator --ranks 4 --microbatches 8 --F 1 --B 2 --W 1 \\
        --comm 0.1 --n 4 --schedules 1f1b,zbv,dualpipev --overlap both --png timeline.png
    python -m mhc_train.parallel.simulator --ranks 4 --microbatches 16 --comm 0.2 --compare-n 1,4

The model (docs/simulator.md has the long form):
- Each schedule is a list of compute actions per rank, generated programmatically (the DualPipe
  family follows the 8 labelled steps of deepseek-ai/DualPipe's ``step``). An action is F
  (forward), B (full backward), I (input-gradient half of a split backward), W (weight-gradient
  half) of one stage on one micro-batch, or an F&B pair (a forward and a backward chunk run
  overlapped).
- Every rank runs its list in order on one compute lane (list scheduling): an action starts when
  the lane is free and its inputs are there. F(s, m) needs F(s-1, m); B/I(s, m) needs F(s, m) and
  B/I(s+1, m); W(s, m) needs I(s, m). Crossing to another rank costs one message on the directed
  link between the two ranks (links serialise their messages). If no rank can start its next
  action the schedule is deadlocked and :class:`ScheduleDeadlock` says where.
- Overlap of F&B pairs: a pair takes ``--fb`` or max(F, B) + ``--fb-overhead``; without it the
  pair runs as F then B. Overlap of communication: sends run on the link while compute goes on;
  without it the compute lane waits until the rank's sends are delivered.
- Activation memory: +1 when a forward starts, -1 when the stage's backward no longer needs it,
  i.e. at the end of B, or of W when the backward is split (W needs the saved inputs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Union

SCHEDULES = ("1f1b", "zb1p", "zbv", "dualpipe", "dualpipev")
SCHEDULE_TITLES = {
    "1f1b": "1F1B",
    "zb1p": "ZB1P (ZB-H1)",
    "zbv": "ZB-V",
    "dualpipe": "DualPipe",
    "dualpipev": "DualPipeV",
}
# overlap mode -> (overlap the F&B pairs, overlap communication with compute)
OVERLAP_MODES = {"off": (False, False), "fb": (True, False), "comm": (False, True),
                 "on": (True, True)}
OVERLAP_CHOICES = {"both": ("off", "on"), "all": ("off", "fb", "comm", "on")}


class SimulatorInputError(ValueError):
    """Impossible input (times, counts, schedule requirements); the CLI prints it and exits 2."""


class ScheduleDeadlock(RuntimeError):
    """No rank can start its next action."""


# --------------------------------------------------------------------------------------------
# Actions and schedules


@dataclass(frozen=True)
class Op:
    """One compute chunk: kind F, B (full backward), I (input grad) or W (weight grad)."""

    kind: str
    stage: int
    mb: int
    direction: int = 0  # DualPipe only: 0 = micro-batches entering at rank 0, 1 = at the last rank

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.direction, self.stage, self.mb)

    def __str__(self) -> str:
        d = f"d{self.direction}" if self.direction else ""
        return f"{self.kind}{self.mb}@s{self.stage}{d}"


@dataclass(frozen=True)
class Pair:
    """A forward chunk and a backward chunk issued together to be run overlapped."""

    f: Op
    b: Op
    kind: str = "F&B"

    def __str__(self) -> str:
        return f"({self.f}+{self.b})"


Action = Union[Op, Pair]


@dataclass
class Schedule:
    name: str
    ranks: int
    microbatches: int  # total over both directions for DualPipe
    num_stages: int  # stages of one pipeline (per direction)
    rank_of: dict[tuple[int, int], int]  # (direction, stage) -> rank
    actions: list[list[Action]]
    chunks_of_rank: list[list[tuple[int, int]]]  # rank -> [(direction, stage), ...] in chunk order

    def chunk_index(self, rank: int, op: Op) -> int:
        return self.chunks_of_rank[rank].index((op.direction, op.stage))

    def ops(self) -> Iterator[tuple[int, Op]]:
        for r, acts in enumerate(self.actions):
            for a in acts:
                if isinstance(a, Pair):
                    yield r, a.f
                    yield r, a.b
                else:
                    yield r, a


def _chunks(rank_of: dict[tuple[int, int], int], ranks: int) -> list[list[tuple[int, int]]]:
    out: list[list[tuple[int, int]]] = [[] for _ in range(ranks)]
    for key, r in sorted(rank_of.items()):
        out[r].append(key)
    return out


def schedule_1f1b(ranks: int, microbatches: int) -> Schedule:
    """One stage per rank: warm-up forwards, then one forward / one backward, then cool-down."""
    rank_of = {(0, s): s for s in range(ranks)}
    actions = []
    for r in range(ranks):
        warmup = min(ranks - 1 - r, microbatches)
        acts: list[Action] = [Op("F", r, i) for i in range(warmup)]
        f, b = warmup, 0
        while f < microbatches:
            acts += [Op("F", r, f), Op("B", r, b)]
            f, b = f + 1, b + 1
        acts += [Op("B", r, i) for i in range(b, microbatches)]
        actions.append(acts)
    return Schedule("1f1b", ranks, microbatches, ranks, rank_of, actions, _chunks(rank_of, ranks))


def schedule_zb1p(ranks: int, microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al., Zero Bubble PP): 1F1B with split backward; rank r keeps up to
    ranks-1-r weight-gradient chunks deferred, which fills the cool-down bubble, and flushes them
    at the end. Activation memory stays at 1F1B's (PP on rank 0)."""
    rank_of = {(0, s): s for s in range(ranks)}
    actions = []
    for r in range(ranks):
        keep = r
        warmup = min(ranks - 1 - r, microbatches)
        acts: list[Action] = [Op("F", r, i) for i in range(warmup)]
        pending: deque[int] = deque()
        f, b = warmup, 0

        def backward(i: int) -> None:
            acts.append(Op("I", r, i))
            pending.append(i)
            if len(pending) > keep:
                acts.append(Op("W", r, pending.popleft()))

        while f < microbatches:
            acts.append(Op("F", r, f))
            backward(b)
            f, b = f + 1, b + 1
        for i in range(b, microbatches):
            backward(i)
        acts += [Op("W", r, i) for i in pending]
        actions.append(acts)
    return Schedule("zb1p", ranks, microbatches, ranks, rank_of, actions, _chunks(rank_of, ranks))


def _v_rank_of(ranks: int) -> dict[tuple[int, int], int]:
    """V shape: rank r holds stage r and stage 2*ranks-1-r (rank 0 has the first and the last)."""
    rank_of = {}
    for s in range(2 * ranks):
        rank_of[(0, s)] = s if s < ranks else 2 * ranks - 1 - s
    return rank_of


def schedule_zbv(ranks: int, microbatches: int) -> Schedule:
    """ZB-V as in torch.distributed.pipelining.ScheduleZBVZeroBubble: warm-up F0s, F1F0 pairs,
    F1 I1 W1, steady F0 I0 W0 F1 I1 W1, cool-down I0 I1 then I0 W0 and the remaining Ws. With
    fewer than 2*ranks-1 micro-batches the missing slots are dropped, as torch does."""
    rank_of = _v_rank_of(ranks)
    n_stages = 2 * ranks
    n_micro = max(2 * ranks - 1, microbatches)
    actions = []
    for r in range(ranks):
        s0, s1 = r, n_stages - 1 - r
        acts: list[Op] = []
        f0 = f1 = b0 = b1 = 0
        for _ in range(2 * (ranks - r) - 1):
            acts.append(Op("F", s0, f0))
            f0 += 1
        for _ in range(r):
            acts += [Op("F", s1, f1), Op("F", s0, f0)]
            f1, f0 = f1 + 1, f0 + 1
        for _ in range(ranks - r):
            acts += [Op("F", s1, f1), Op("I", s1, b1), Op("W", s1, b1)]
            f1, b1 = f1 + 1, b1 + 1
        while f1 < f0 or f0 < n_micro:
            if f0 < n_micro:
                acts.append(Op("F", s0, f0))
                f0 += 1
            acts += [Op("I", s0, b0), Op("W", s0, b0)]
            b0 += 1
            acts += [Op("F", s1, f1), Op("I", s1, b1), Op("W", s1, b1)]
            f1, b1 = f1 + 1, b1 + 1
        w0, w1 = b0, b1
        for _ in range(r):
            acts += [Op("I", s0, b0), Op("I", s1, b1)]
            b0, b1 = b0 + 1, b1 + 1
        for _ in range(ranks - r):
            acts += [Op("I", s0, b0), Op("W", s0, w0)]
            b0, w0 = b0 + 1, w0 + 1
        acts += [Op("W", s1, i) for i in range(w1, b1)]
        acts += [Op("W", s0, i) for i in range(w0, b0)]
        actions.append([a for a in acts if a.mb < microbatches])
    return Schedule("zbv", ranks, microbatches, n_stages, rank_of, actions, _chunks(rank_of, ranks))


def _dualpipe_program(half_rank: int, half_ranks: int, chunks: int, middle: bool) -> list[tuple]:
    """The 8 labelled steps of DualPipe's ``step`` for one rank, in phases 0/1.

    Items: ("F", p), ("B", p, split), ("W",), ("FB", p_forward, p_backward), where a split B is
    an I whose W is queued (FIFO) until a ("W",) pops it. DualPipeV uses the same program with
    rank / #ranks / all micro-batches in place of half_rank / half_ranks / half the micro-batches.
    """
    hr, H, N = half_rank, half_ranks, chunks
    prog: list[tuple] = []
    prog += [("F", 0)] * (2 * (H - hr - 1))  # 1. nF0
    prog += [("F", 0), ("F", 1)] * (hr + 1)  # 2. nF0F1
    prog += [("B", 1, True), ("W",), ("F", 1)] * (H - hr - 1)  # 3. nB1W1F1 (zero bubble)
    for i in range(N - 2 * H + hr + 1):  # 4. main nF0B1F1B0
        if i == 0 and middle:  # the reference does not overlap this first pair (smaller bubble)
            prog += [("F", 0), ("B", 1, False)]
        else:
            prog.append(("FB", 0, 1))
        prog.append(("FB", 1, 0))
    prog += [("B", 1, False), ("FB", 1, 0)] * (H - hr - 1)  # 5. nB1F1B0
    split = False  # 6. nB1B0, second half with split backward
    steps6 = hr + 1
    for i in range(steps6):
        if i == steps6 // 2 and hr % 2 == 1:
            split = True
        prog.append(("B", 1, split))
        if i == steps6 // 2 and hr % 2 == 0:
            split = True
        prog.append(("B", 0, split))
    prog += [("W",), ("B", 0, True)] * (H - hr - 1)  # 7. nWB0
    prog += [("W",)] * (hr + 1)  # 8. nW
    return prog


def _lower_program(prog: list[tuple], phase_chunk: dict[int, tuple[int, int]]) -> list[Action]:
    """Turn phases into ops with micro-batch counters per phase and the FIFO of deferred Ws."""
    f_count = {0: 0, 1: 0}
    b_count = {0: 0, 1: 0}
    w_queue: deque[Op] = deque()
    acts: list[Action] = []

    def fwd(p: int) -> Op:
        d, s = phase_chunk[p]
        f_count[p] += 1
        return Op("F", s, f_count[p] - 1, d)

    def bwd(p: int, split: bool) -> Op:
        d, s = phase_chunk[p]
        b_count[p] += 1
        op = Op("I" if split else "B", s, b_count[p] - 1, d)
        if split:
            w_queue.append(Op("W", s, op.mb, d))
        return op

    for item in prog:
        if item[0] == "F":
            acts.append(fwd(item[1]))
        elif item[0] == "B":
            acts.append(bwd(item[1], item[2]))
        elif item[0] == "W":
            if w_queue:
                acts.append(w_queue.popleft())
        else:
            acts.append(Pair(fwd(item[1]), bwd(item[2], False)))
    if w_queue:
        raise AssertionError("weight-gradient queue not drained")
    return acts


def schedule_dualpipe(ranks: int, microbatches: int) -> Schedule:
    """Bidirectional DualPipe (DeepSeek-V3): half the micro-batches enter at rank 0 (direction 0),
    half at the last rank (direction 1); rank r holds stage r of direction 0 and stage ranks-1-r
    of direction 1 (two copies of the parameters)."""
    R, H = ranks, ranks // 2
    rank_of = {}
    for s in range(R):
        rank_of[(0, s)] = s
        rank_of[(1, s)] = R - 1 - s
    actions = []
    for r in range(R):
        hr = min(r, R - 1 - r)
        second_half = r >= H
        own = {0: (0, r), 1: (1, R - 1 - r)}
        # phase 0 is the forward direction on the first half, the reverse one on the second half
        phase_chunk = {p: own[p ^ int(second_half)] for p in (0, 1)}
        prog = _dualpipe_program(hr, H, microbatches // 2, middle=hr == H - 1)
        actions.append(_lower_program(prog, phase_chunk))
    return Schedule("dualpipe", R, microbatches, R, rank_of, actions, _chunks(rank_of, R))


def schedule_dualpipev(ranks: int, microbatches: int) -> Schedule:
    """DualPipeV (the "cut-in-half" DualPipe; torch's ScheduleDualPipeV): V shape, rank r holds
    stages r and 2*ranks-1-r; DualPipe's program with rank/#ranks in place of half_rank/H."""
    rank_of = _v_rank_of(ranks)
    n_stages = 2 * ranks
    actions = []
    for r in range(ranks):
        phase_chunk = {0: (0, r), 1: (0, n_stages - 1 - r)}
        prog = _dualpipe_program(r, ranks, microbatches, middle=r == ranks - 1)
        actions.append(_lower_program(prog, phase_chunk))
    return Schedule("dualpipev", ranks, microbatches, n_stages, rank_of, actions,
                    _chunks(rank_of, ranks))


BUILDERS = {
    "1f1b": schedule_1f1b,
    "zb1p": schedule_zb1p,
    "zbv": schedule_zbv,
    "dualpipe": schedule_dualpipe,
    "dualpipev": schedule_dualpipev,
}


def check_schedule_input(name: str, ranks: int, microbatches: int) -> None:
    """Requirements of each schedule (the reference codes' own asserts)."""
    if name not in BUILDERS:
        raise SimulatorInputError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    if ranks < 1 or microbatches < 1:
        raise SimulatorInputError(
            f"need ranks >= 1 and microbatches >= 1, got {ranks}, {microbatches}")
    if name == "dualpipe":
        if ranks % 2 or ranks < 2:
            raise SimulatorInputError(f"dualpipe needs an even number of ranks, got {ranks}")
        if microbatches % 2 or microbatches < 2 * ranks:
            raise SimulatorInputError(
                f"dualpipe needs an even number of micro-batches >= 2 x ranks = {2 * ranks}, "
                f"got {microbatches}")
    if name == "dualpipev" and microbatches < 2 * ranks:
        raise SimulatorInputError(
            f"dualpipev needs micro-batches >= stages = 2 x ranks = {2 * ranks} "
            f"(num_chunks >= 2*#ranks in the reference code), got {microbatches}")


def build_schedule(name: str, ranks: int, microbatches: int) -> Schedule:
    check_schedule_input(name, ranks, microbatches)
    return BUILDERS[name](ranks, microbatches)


# --------------------------------------------------------------------------------------------
# Times


@dataclass
class Times:
    """Durations in one arbitrary unit (ms, say).

    F, B, W: one micro-batch through one stage: forward, full backward, weight-gradient part of B
    (the input-gradient part is B - W). fb: time of an overlapped F&B pair, else max(F, B) +
    fb_overhead. Message time (one activation or gradient across a stage boundary) =
    latency + n * (comm, or message_bytes / bandwidth when comm is not given); n is the
    residual-stream multiplier (mHC sends [B, S, n, C] instead of [B, S, C]).
    """

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    fb: float | None = None
    fb_overhead: float = 0.0
    comm: float | None = None
    message_bytes: float | None = None
    bandwidth: float | None = None
    latency: float = 0.0
    n: float = 1.0

    def validate(self) -> None:
        for name in ("F", "B"):
            if not getattr(self, name) > 0:
                raise SimulatorInputError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("W", "fb_overhead", "latency"):
            if getattr(self, name) < 0:
                raise SimulatorInputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.W > self.B:
            raise SimulatorInputError(f"W ({self.W}) is part of B ({self.B}) and cannot exceed it")
        if self.fb is not None and not self.fb > 0:
            raise SimulatorInputError(f"fb must be > 0, got {self.fb}")
        if self.comm is not None and self.comm < 0:
            raise SimulatorInputError(f"comm must be >= 0, got {self.comm}")
        if self.comm is None and (self.message_bytes is None) != (self.bandwidth is None):
            raise SimulatorInputError("give message_bytes and bandwidth together (or comm)")
        if self.message_bytes is not None and self.message_bytes < 0:
            raise SimulatorInputError(f"message_bytes must be >= 0, got {self.message_bytes}")
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise SimulatorInputError(f"bandwidth must be > 0, got {self.bandwidth}")
        if not self.n >= 1:
            raise SimulatorInputError(f"n must be >= 1, got {self.n}")
        for name, v in asdict(self).items():
            if v is not None and not math.isfinite(v):
                raise SimulatorInputError(f"{name} must be finite, got {v}")

    @property
    def base_message_time(self) -> float:
        if self.comm is not None:
            return self.comm
        if self.message_bytes is not None and self.bandwidth is not None:
            return self.message_bytes / self.bandwidth
        return 0.0

    @property
    def message_time(self) -> float:
        base = self.base_message_time
        if base == 0 and self.latency == 0:
            return 0.0
        return self.latency + self.n * base

    def op_time(self, kind: str) -> float:
        return {"F": self.F, "B": self.B, "I": self.B - self.W, "W": self.W}[kind]

    def pair_time(self, pair: Pair) -> float:
        if self.fb is not None:
            return self.fb
        return max(self.op_time(pair.f.kind), self.op_time(pair.b.kind)) + self.fb_overhead

    def scaled(self, factor: float) -> "Times":
        """Compute times times ``factor`` (message time unchanged)."""
        return replace(self, F=self.F * factor, B=self.B * factor, W=self.W * factor,
                       fb=None if self.fb is None else self.fb * factor,
                       fb_overhead=self.fb_overhead * factor)


def stage_times(name: str, times: Times, per: str) -> Times:
    """Per-stage times of a schedule. per="stage": as given. per="rank": the given times are for
    the layers one rank holds in 1F1B; V-shape schedules cut that share into two stages."""
    if per == "stage" or name not in ("zbv", "dualpipev"):
        return times
    if per != "rank":
        raise SimulatorInputError(f"per must be 'rank' or 'stage', got {per!r}")
    return times.scaled(0.5)


# --------------------------------------------------------------------------------------------
# Simulation


@dataclass
class Interval:
    rank: int
    lane: str  # "compute", "comm" or "blocked" (compute lane waiting for its sends)
    start: float
    end: float
    kind: str  # F, B, I, W, F&B, send
    label: str
    chunk: int = 0  # which of the rank's model chunks (0 or 1), for colour shading
    detail: tuple = ()  # for F&B: (f_mb, f_chunk, b_mb, b_chunk); for send: (dst,)


@dataclass
class SimResult:
    schedule: str
    ranks: int
    microbatches: int
    overlap_fb: bool
    overlap_comm: bool
    message_time: float
    makespan: float
    busy: list[float]
    peak_memory: list[int]
    blocked: list[float]  # compute-lane time spent waiting for own sends (no comm overlap)
    comm_busy: float  # total link time
    intervals: list[Interval] = field(default_factory=list, repr=False)
    # (kind, direction, stage, micro-batch) -> (rank, start, end); a pair's two ops share times
    op_times: dict[tuple, tuple[int, float, float]] = field(default_factory=dict, repr=False)
    exposed_comm: float = float("nan")  # makespan minus makespan with zero message time

    @property
    def idle(self) -> list[float]:
        return [self.makespan - b for b in self.busy]

    @property
    def bubble_fraction(self) -> float:
        return sum(self.idle) / (self.ranks * self.makespan)

    @property
    def overlap_label(self) -> str:
        return {v: k for k, v in OVERLAP_MODES.items()}[(self.overlap_fb, self.overlap_comm)]


def _expand(actions: list[Action], overlap_fb: bool) -> list[Action]:
    if overlap_fb:
        return list(actions)
    out: list[Action] = []
    for a in actions:
        out += [a.f, a.b] if isinstance(a, Pair) else [a]
    return out


def simulate(schedule: Schedule, times: Times, *, overlap_fb: bool = True,
             overlap_comm: bool = True) -> SimResult:
    """List-schedule every rank's actions in order; raise ScheduleDeadlock if stuck."""
    times.validate()
    R, S = schedule.ranks, schedule.num_stages
    msg = times.message_time
    lists = [_expand(a, overlap_fb) for a in schedule.actions]

    f_end: dict[tuple, float] = {}  # forward done (same rank)
    g_end: dict[tuple, float] = {}  # input gradient done (B or I)
    i_end: dict[tuple, float] = {}  # I done, W may start
    f_arrive: dict[tuple, float] = {}  # activation of (d, s, m) available at stage s+1
    g_arrive: dict[tuple, float] = {}  # gradient of (d, s, m)'s input available at stage s-1
    done: set[tuple] = set()
    lane_free = [0.0] * R
    link_free: dict[tuple[int, int], float] = {}
    busy = [0.0] * R
    blocked = [0.0] * R
    comm_busy = 0.0
    mem_events: list[list[tuple[float, int]]] = [[] for _ in range(R)]
    intervals: list[Interval] = []
    op_times: dict[tuple, tuple[int, float, float]] = {}

    def dep_time(op: Op) -> float | None:
        d, s, m = op.key
        if op.kind == "F":
            return 0.0 if s == 0 else f_arrive.get((d, s - 1, m))
        if op.kind in ("B", "I"):
            fe = f_end.get(op.key)
            if fe is None or s == S - 1:
                return fe
            g = g_arrive.get((d, s + 1, m))
            return None if g is None else max(fe, g)
        return i_end.get(op.key)  # W

    def send(src: int, dst: int, t: float, what: str) -> float:
        nonlocal comm_busy
        if msg == 0:
            return t
        start = max(t, link_free.get((src, dst), 0.0))
        end = start + msg
        link_free[(src, dst)] = end
        comm_busy += msg
        intervals.append(Interval(src, "comm", start, end, "send", what, detail=(dst,)))
        return end

    def finish(r: int, op: Op, start: float, end: float) -> float:
        """Record op's results; return when its sends are delivered."""
        d, s, m = op.key
        key = (op.kind, d, s, m)
        if key in done:
            raise AssertionError(f"{op} scheduled twice")
        done.add(key)
        op_times[key] = (r, start, end)
        last_send = end
        if op.kind == "F":
            f_end[op.key] = end
            mem_events[r].append((start, +1))
            if s < S - 1:
                dst = schedule.rank_of[(d, s + 1)]
                f_arrive[op.key] = end if dst == r else send(r, dst, end, f"a{m}")
                last_send = max(last_send, f_arrive[op.key])
        elif op.kind in ("B", "I"):
            g_end[op.key] = end
            if op.kind == "I":
                i_end[op.key] = end
            else:
                mem_events[r].append((end, -1))
            if s > 0:
                dst = schedule.rank_of[(d, s - 1)]
                g_arrive[op.key] = end if dst == r else send(r, dst, end, f"g{m}")
                last_send = max(last_send, g_arrive[op.key])
        else:
            mem_events[r].append((end, -1))
        return last_send

    idx = [0] * R
    remaining = sum(len(x) for x in lists)
    while remaining:
        progress = False
        for r in range(R):
            while idx[r] < len(lists[r]):
                a = lists[r][idx[r]]
                sub = [a.f, a.b] if isinstance(a, Pair) else [a]
                deps = [dep_time(o) for o in sub]
                if any(t is None for t in deps):
                    break
                for o in sub:
                    if schedule.rank_of[(o.direction, o.stage)] != r:
                        raise AssertionError(f"{o} is not on rank {r}")
                start = max([lane_free[r], *deps])
                dur = times.pair_time(a) if isinstance(a, Pair) else times.op_time(a.kind)
                end = start + dur
                delivered = max(finish(r, o, start, end) for o in sub)
                busy[r] += dur
                if isinstance(a, Pair):
                    cf, cb = (schedule.chunk_index(r, o) for o in sub)
                    intervals.append(Interval(r, "compute", start, end, "F&B",
                                              f"{a.f.mb}|{a.b.mb}", cf,
                                              (a.f.mb, cf, a.b.mb, cb)))
                else:
                    intervals.append(Interval(r, "compute", start, end, a.kind, str(a.mb),
                                              schedule.chunk_index(r, a)))
                lane_free[r] = end
                if not overlap_comm and delivered > end:
                    intervals.append(Interval(r, "blocked", end, delivered, "blocked", ""))
                    blocked[r] += delivered - end
                    lane_free[r] = delivered
                idx[r] += 1
                remaining -= 1
                progress = True
        if not progress:
            heads = "; ".join(f"rank {r}: {lists[r][idx[r]]}" for r in range(R)
                              if idx[r] < len(lists[r]))
            raise ScheduleDeadlock(f"{schedule.name}: deadlock, waiting actions: {heads}")

    peak = []
    for ev in mem_events:  # in execution order: a pair's forward allocates before its B frees
        cur = best = 0
        for _, delta in ev:
            cur += delta
            best = max(best, cur)
        peak.append(best)
    makespan = max(lane_free)
    return SimResult(schedule.name, R, schedule.microbatches, overlap_fb, overlap_comm, msg,
                     makespan, busy, peak, blocked, comm_busy, intervals, op_times)


def evaluate(name: str, ranks: int, microbatches: int, times: Times, *, overlap: str = "on",
             per: str = "rank") -> SimResult:
    """Simulate one schedule in one overlap mode; exposed_comm = makespan - makespan at zero
    message time (same schedule, same overlap)."""
    if overlap not in OVERLAP_MODES:
        raise SimulatorInputError(f"unknown overlap mode {overlap!r}")
    times.validate()
    sched = build_schedule(name, ranks, microbatches)
    st = stage_times(name, times, per)
    ofb, oc = OVERLAP_MODES[overlap]
    res = simulate(sched, st, overlap_fb=ofb, overlap_comm=oc)
    if res.message_time == 0:
        res.exposed_comm = 0.0
    else:
        quiet = replace(st, comm=0.0, latency=0.0)
        res.exposed_comm = res.makespan - simulate(sched, quiet, overlap_fb=ofb,
                                                   overlap_comm=oc).makespan
    return res


# --------------------------------------------------------------------------------------------
# The bubble formulas of the DualPipe README (docs/simulator.md explains the conventions)


def formula_bubble(name: str, ranks: int, times: Times) -> float | None:
    """Per-rank bubble of the README table for per-stage times F, B, W, F&B and no comm.

    PP = number of stages of one pipeline: ranks for 1F1B / ZB1P / DualPipe, 2 x ranks for
    DualPipeV (its #devices is PP/2). F&B = the pair time the simulator uses."""
    F, B, W = times.F, times.B, times.W
    FB = times.fb if times.fb is not None else max(F, B) + times.fb_overhead
    if name == "1f1b":
        return (ranks - 1) * (F + B)
    if name == "zb1p":
        return (ranks - 1) * (F + B - 2 * W)
    if name == "dualpipe":
        return (ranks / 2 - 1) * (FB + B - 3 * W)
    if name == "dualpipev":
        return (2 * ranks / 2 - 1) * (FB + B - 3 * W)
    return None


def formula_conditions(name: str, times: Times) -> str:
    """Empty when the README formula is exact in this model, else the assumption it misses
    (found by simulation over a grid of times, docs/simulator.md)."""
    if name == "zb1p" and times.W > min(times.F, times.B - times.W):
        return "formula assumes W <= min(F, B - W)"
    if name in ("dualpipe", "dualpipev"):
        if not math.isclose(times.F, times.B - times.W):
            return "formula assumes F = B - W"
        if times.W > times.F:
            return "formula assumes W <= F"
    return ""


# --------------------------------------------------------------------------------------------
# Reports


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def results_table(results: list[SimResult], stage_time_of: dict[str, Times] | None = None,
                  share_of: dict[str, float] | None = None) -> str:
    """Side-by-side table; 'README bubble' is the per-rank formula (zero comm, equal chunks).
    Peak activations count stage-micro-batches; share_of[name] (the fraction of a rank's layers
    in one stage) converts them to units of the rank's whole share of the model."""
    head = ["schedule", "overlap", "chunks/rank", "F/B/W per stage", "step time", "bubble %",
            "max idle/rank", "README bubble", "peak act r0/max", "act x share",
            "exposed comm", "send-blocked"]
    rows = []
    for r in results:
        st = (stage_time_of or {}).get(r.schedule)
        sched = build_schedule(r.schedule, r.ranks, r.microbatches)
        formula = None
        if st is not None:
            fb = replace(st, fb=st.F + st.B) if not r.overlap_fb else st
            formula = formula_bubble(r.schedule, r.ranks, fb)
        rows.append([
            SCHEDULE_TITLES[r.schedule], r.overlap_label, str(len(sched.chunks_of_rank[0])),
            "-" if st is None else f"{_fmt(st.F)}/{_fmt(st.B)}/{_fmt(st.W)}",
            _fmt(r.makespan), f"{100 * r.bubble_fraction:.1f}", _fmt(max(r.idle)),
            "-" if formula is None else _fmt(formula),
            f"{r.peak_memory[0]}/{max(r.peak_memory)}",
            "-" if share_of is None else _fmt(max(r.peak_memory) * share_of[r.schedule]),
            _fmt(r.exposed_comm), _fmt(max(r.blocked)),
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def effective_modes(name: str, overlaps: list[str]) -> list[str]:
    """Overlap modes that differ for this schedule: only DualPipe(V) has F&B pairs, so for the
    others 'fb' is 'off' and 'on' is 'comm'."""
    if name in ("dualpipe", "dualpipev"):
        return list(overlaps)
    out: list[str] = []
    for ov in overlaps:
        ov = {"fb": "off", "on": "comm"}.get(ov, ov)
        if ov not in out:
            out.append(ov)
    return out


def compare_n(schedules: list[str], ranks: int, microbatches: int, times: Times, ns: list[float],
              overlaps: list[str], per: str) -> tuple[str, list[dict]]:
    """Step time and exposed comm per schedule and overlap mode for each stream multiplier n."""
    records = []
    for name in schedules:
        for ov in effective_modes(name, overlaps):
            base = None
            for n in ns:
                res = evaluate(name, ranks, microbatches, replace(times, n=n), overlap=ov, per=per)
                base = res.makespan if base is None else base
                records.append({"schedule": name, "overlap": ov, "n": n,
                                "message_time": res.message_time, "step_time": res.makespan,
                                "exposed_comm": res.exposed_comm,
                                "bubble_fraction": res.bubble_fraction,
                                "vs_first_n": res.makespan / base - 1})
    head = ["schedule", "overlap", "n", "message time", "step time", "exposed comm", "bubble %",
            f"step vs n={ns[0]:g}"]
    rows = [[SCHEDULE_TITLES[r["schedule"]], r["overlap"], f"{r['n']:g}", _fmt(r["message_time"]),
             _fmt(r["step_time"]), _fmt(r["exposed_comm"]), f"{100 * r['bubble_fraction']:.1f}",
             f"{100 * r['vs_first_n']:+.1f}%"] for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines), records


# --------------------------------------------------------------------------------------------
# Command line

_TIME_KEYS = ("F", "B", "W", "fb", "fb_overhead", "comm", "message_bytes", "bandwidth",
              "latency", "n")
_DEFAULTS = {"ranks": 4, "microbatches": 8, "schedules": "1f1b,zbv,dualpipev", "overlap": "both",
             "per": "rank", "F": 1.0, "B": 2.0, "W": 1.0, "fb_overhead": 0.0, "latency": 0.0,
             "n": 1.0}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mhc-train-simulate",
        description="Simulate pipeline schedules (1F1B, ZB1P, ZB-V, DualPipe, DualPipeV) and "
                    "report step time, bubble, peak activation memory and exposed communication. "
                    "Times are in one arbitrary unit (ms, say). Values come from the defaults, "
                    "then --config, then the flags given.",
        epilog="Example: --ranks 4 --microbatches 8 --F 1 --B 2 --W 1 --comm 0.1 --n 4 "
               "--schedules 1f1b,zbv,dualpipev --overlap both --png out.png. "
               "Bracketed values are the defaults. Exit status 2 on bad input.")
    a = p.add_argument
    a("--config", help="JSON or YAML file whose keys are these flags' names with underscores "
                       "(ranks, microbatches, F, B, W, fb, comm, n, schedules, overlap, ...)")
    a("--ranks", type=int, help="pipeline ranks (devices) [4]")
    a("--microbatches", type=int, help="micro-batches per step, both directions together for "
                                       "dualpipe [8]")
    a("--schedules", help=f"comma-separated, from {','.join(SCHEDULES)} [1f1b,zbv,dualpipev]")
    a("--overlap", help="off | fb (F&B pairs overlapped) | comm (sends overlap compute) | "
                        "on (both) | both (= off and on) | all; comma lists allowed [both]")
    a("--per", choices=("rank", "stage"),
      help="'rank': F/B/W/fb are one micro-batch through the layers one rank holds (1F1B "
           "stage); V-shape schedules (zbv, dualpipev) split them into two stages of half the "
           "time. 'stage': the times are per stage whatever the schedule (the README table's "
           "convention) [rank]")
    a("--F", type=float, help="forward time [1.0]")
    a("--B", type=float, help="full backward time (input grad + weight grad) [2.0]")
    a("--W", type=float, help="weight-gradient part of B; the input-gradient part is B - W [1.0]")
    a("--fb", type=float, help="time of an overlapped F&B pair (default max(F, B) + "
                               "--fb-overhead)")
    a("--fb-overhead", dest="fb_overhead", type=float,
      help="added to max(F, B) for an overlapped pair [0]")
    a("--comm", type=float, help="time of one stage-boundary message at n = 1 (activation "
                                 "or its gradient) [0]")
    a("--message-bytes", dest="message_bytes", type=float,
      help="bytes of one message at n = 1 (e.g. micro-batch x seq x C x 2); with --bandwidth, "
           "instead of --comm")
    a("--bandwidth", type=float, help="bytes per time unit of one link")
    a("--latency", type=float, help="fixed time per message, not scaled by n [0]")
    a("--n", type=float, help="residual-stream multiplier of the messages (mHC/HC: n; baseline: "
                              "1) [1]")
    a("--compare-n", dest="compare_n",
      help="comma list of n (e.g. 1,4): table of step time and exposed comm per schedule and "
           "overlap mode for each n")
    a("--png", help="write the timelines as a PNG; a path containing {schedule} and "
                    "{overlap} gives one file per run")
    a("--dpi", type=int, help="PNG resolution [90]")
    a("--json", help="write all results as JSON")
    a("--actions", action="store_true", help="print each rank's action list")
    return p


def _load_config(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SimulatorInputError(f"{path}: expected a mapping of option names to values")
    known = set(_DEFAULTS) | set(_TIME_KEYS) | {"compare_n", "png", "json", "dpi"}
    unknown = sorted(set(k.replace("-", "_") for k in data) - known)
    if unknown:
        raise SimulatorInputError(f"{path}: unknown keys {', '.join(unknown)}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _split(value, cast=str) -> list:
    if isinstance(value, (list, tuple)):
        return [cast(v) for v in value]
    return [cast(v.strip()) for v in str(value).split(",") if v.strip()]


def _overlap_modes(value) -> list[str]:
    modes: list[str] = []
    if isinstance(value, bool):  # YAML reads a bare off / on as a boolean
        value = "on" if value else "off"
    for v in _split(value):
        for m in OVERLAP_CHOICES.get(v, (v,)):
            if m not in OVERLAP_MODES:
                raise SimulatorInputError(
                    f"unknown overlap mode {m!r}; choose from off, fb, comm, on, both, all")
            if m not in modes:
                modes.append(m)
    return modes


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    opts = dict(_DEFAULTS)
    if args.config:
        try:
            opts.update(_load_config(args.config))
        except OSError as e:
            raise SimulatorInputError(f"cannot read config: {e}") from e
        except (json.JSONDecodeError, ValueError) as e:
            if isinstance(e, SimulatorInputError):
                raise
            raise SimulatorInputError(f"{args.config}: {e}") from e
    opts.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    try:
        times = Times(**{k: (None if opts.get(k) is None else float(opts[k]))
                         for k in _TIME_KEYS if k in opts})
        ranks, micro = int(opts["ranks"]), int(opts["microbatches"])
    except (TypeError, ValueError) as e:
        raise SimulatorInputError(f"bad value: {e}") from e
    times.validate()
    schedules = _split(opts["schedules"], lambda s: s.lower())
    overlaps = _overlap_modes(opts["overlap"])
    per = opts["per"]
    if per not in ("rank", "stage"):
        raise SimulatorInputError(f"per must be 'rank' or 'stage', got {per!r}")
    for name in schedules:
        check_schedule_input(name, ranks, micro)

    print(f"{ranks} ranks, {micro} micro-batches, times per {per}: F={_fmt(times.F)} "
          f"B={_fmt(times.B)} W={_fmt(times.W)} F&B="
          f"{_fmt(times.fb) if times.fb is not None else f'max(F,B)+{_fmt(times.fb_overhead)}'}"
          f", message time {_fmt(times.message_time)} (n={times.n:g})")
    out: dict = {"options": opts}
    if opts.get("compare_n") is not None:
        ns = _split(opts["compare_n"], float)
        for n in ns:
            if not n >= 1:
                raise SimulatorInputError(f"compare-n values must be >= 1, got {n:g}")
        if times.message_time == 0:
            raise SimulatorInputError("--compare-n needs a message time: give --comm or "
                                      "--message-bytes and --bandwidth")
        table, records = compare_n(schedules, ranks, micro, times, ns, overlaps, per)
        print(table)
        out["compare_n"] = records
    results = [evaluate(name, ranks, micro, times, overlap=ov, per=per)
               for name in schedules for ov in effective_modes(name, overlaps)]
    if opts.get("compare_n") is None:
        shares = None if per == "stage" else {
            s: stage_times(s, times, per).F / times.F for s in schedules}
        print(results_table(results, {s: stage_times(s, times, per) for s in schedules}, shares))
        if times.message_time == 0:
            notes = {formula_conditions(s, stage_times(s, times, per)) for s in schedules} - {""}
            if notes:
                print("note: " + "; ".join(sorted(notes)) + " (docs/simulator.md)")
        else:
            print("note: README bubble assumes zero communication")
    if args.actions:
        for name in schedules:
            sched = build_schedule(name, ranks, micro)
            print(f"{SCHEDULE_TITLES[name]} actions:")
            for r, acts in enumerate(sched.actions):
                print(f"  rank {r}: " + " ".join(str(a) for a in acts))
    if opts.get("png"):
        from mhc_train.parallel.timeline_plot import plot_timelines

        for path in plot_timelines(results, opts["png"], dpi=int(opts.get("dpi", 90))):
            print(f"wrote {path}")
    out["results"] = [{
        "schedule": r.schedule, "overlap": r.overlap_label, "step_time": r.makespan,
        "bubble_fraction": r.bubble_fraction, "idle": r.idle, "busy": r.busy,
        "peak_memory": r.peak_memory, "exposed_comm": r.exposed_comm, "blocked": r.blocked,
        "message_time": r.message_time} for r in results]
    if opts.get("json"):
        Path(opts["json"]).write_text(json.dumps(out, indent=1))
        print(f"wrote {opts['json']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except SimulatorInputError as e:
        print(f"mhc-train-simulate: error: {e}", file=sys.stderr)
        return 2
    except ScheduleDeadlock as e:  # only a broken schedule generator gets here
        print(f"mhc-train-simulate: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
