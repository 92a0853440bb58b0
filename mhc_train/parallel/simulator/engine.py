"""Event simulation of a schedule on compute lanes and links: Times (chunk and message
durations), simulate (list scheduling, activation memory, sends) and evaluate (one schedule in
one overlap mode, with its exposed communication)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from mhc_train.parallel.simulator.schedules import (
    Action,
    Op,
    Pair,
    Schedule,
    SimulatorInputError,
    build_schedule,
)

# overlap mode -> (overlap the F&B pairs, overlap communication with compute)
OVERLAP_MODES = {"off": (False, False), "fb": (True, False), "comm": (False, True),
                 "on": (True, True)}


class ScheduleDeadlock(RuntimeError):
    """No rank can start its next action."""


# --------------------------------------------------------------------------------------------
# Times


@dataclass
class Times:
    """Durations in one arbitrary unit (ms, say).

    F, B, W: one micro-batch through one stage: the compute of the forward, the full backward and
    the weight-gradient part of B (the input-gradient part is B - W). a2a_f, a2a_b: the expert
    all-to-all time inside one forward / backward chunk (dispatch + combine, or their gradients;
    0 without expert parallelism), exposed everywhere except inside an overlapped F&B pair, where
    each chunk's all-to-all travels while the other chunk computes (the phase-split pair of
    ``mhc_train.parallel.pipeline.overlap``). fb: the time of an overlapped F&B pair when given
    (e.g. measured), else max(F + B, a2a_f + a2a_b) + fb_overhead: the pair hides communication,
    not compute - two chunks' compute does not run faster together. Message time (one activation
    or gradient across a stage boundary) = latency + n * (comm, or message_bytes / bandwidth when
    comm is not given); n is the residual-stream multiplier (mHC sends [B, S, n, C] instead of
    [B, S, C]).
    """

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    fb: float | None = None
    fb_overhead: float = 0.0
    a2a_f: float = 0.0
    a2a_b: float = 0.0
    comm: float | None = None
    message_bytes: float | None = None
    bandwidth: float | None = None
    latency: float = 0.0
    n: float = 1.0

    def validate(self) -> None:
        for name in ("F", "B"):
            if not getattr(self, name) > 0:
                raise SimulatorInputError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("W", "fb_overhead", "latency", "a2a_f", "a2a_b"):
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

    def compute_time(self, kind: str) -> float:
        return {"F": self.F, "B": self.B, "I": self.B - self.W, "W": self.W}[kind]

    def op_time(self, kind: str) -> float:
        """An action on its own: its compute and its exposed all-to-all (W has none)."""
        a2a = {"F": self.a2a_f, "B": self.a2a_b, "I": self.a2a_b, "W": 0.0}[kind]
        return self.compute_time(kind) + a2a

    def pair_time(self, pair: Pair) -> float:
        if self.fb is not None:
            return self.fb
        compute = self.compute_time(pair.f.kind) + self.compute_time(pair.b.kind)
        return max(compute, self.a2a_f + self.a2a_b) + self.fb_overhead

    def scaled(self, factor: float) -> "Times":
        """Compute and all-to-all times times ``factor`` (stage message time unchanged)."""
        return replace(self, F=self.F * factor, B=self.B * factor, W=self.W * factor,
                       fb=None if self.fb is None else self.fb * factor,
                       fb_overhead=self.fb_overhead * factor, a2a_f=self.a2a_f * factor,
                       a2a_b=self.a2a_b * factor)


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
