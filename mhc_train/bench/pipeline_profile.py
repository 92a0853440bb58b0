"""Pipeline step profile: tokens/s and where each rank's step time goes (compute, pipeline
bubble, exposed communication, runtime overhead), beside the simulator's ideal for the same
measured chunk times.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m mhc_train.bench.pipeline_profile \\
        --model tiny --residual baseline mhc --schedule 1f1b zbv dualpipev --microbatches 4 \\
        --batch 8 --seq 64 --steps 5 [--threads 1] [--json out.json] [--trace trace.json]

Needs torchrun with >= 2 ranks (one pipeline rank per process; gloo on CPU, NCCL with one GPU per
rank). Every (residual, schedule) case is built once, warmed up, then profiled in interleaved
rounds (case A, case B, ..., A, B, ...) so that machine noise hits them alike. Each profiled step
starts after a barrier, so a step is the schedule's makespan as the simulator defines it.

Method (instrumentation of torch.distributed.pipelining's runtime, no sampling profiler):

- Compute: every stage's ``forward_one_chunk`` (F), ``backward_one_chunk`` (B when full, I when
  it computes only the input gradient) and ``backward_weight_one_chunk`` (W) is timed, and the
  loss of the last stage (the schedule's ``_maybe_compute_loss``, counted into that stage's F).
  DualPipeV's OVERLAP_F_B pairs are timed too, for the pair time the simulator needs.
- Communication: the runtime's ``_batch_p2p`` (posting isend/irecv) records, per message, the
  post time and its sequence number on the directed link; ``_wait_batch_p2p`` records each wait.
  Posting itself is timed too and counts as exposed communication (gloo may write a send to
  the socket on the calling thread). Messages between two ranks match in posting order (FIFO
  per link and tag, as gloo and NCCL match them), so for every wait we know when the peer
  posted the other end of each message.
- The split of a wait [a, b] on rank r: ``ready`` = the latest time the peer posted the matching
  send (for a receive: the data exists from then on) or the matching receive (for a send). The
  part of the wait before ``ready`` is **bubble**: the peer had not produced (or not asked for)
  the data yet, a property of the schedule and of the stage times. The part after ``ready`` is
  **exposed communication**: the data was there to send and this rank waited for the transfer.
  Peer times come from the same clock: ranks on one host share CLOCK_MONOTONIC
  (``time.perf_counter``); on several hosts the offset is estimated by a timestamp ping-pong
  (error about half a round trip).
- Fractions of a rank's step time are assigned by priority: any compute running = compute,
  else posting or a wait's transfer part = exposed comm, else a wait's waiting-for-peer part =
  bubble, else **other** (the runtime's own work between chunks: splitting the batch, schedule
  bookkeeping, Python). They sum to 1 by construction.
- Transfer time of one stage message of the boundary shape [mb, S, n, C] is measured by a
  ping-pong between ranks 0 and 1 (minimum round trip / 2: the pure transfer time on idle
  ranks; the median is in the JSON), for the run's n and for n = 1, to show the mHC
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
(taken on idle ranks) is a lower bound. Timing wrappers cost ~1 us per chunk. A single GPU
cannot host two NCCL ranks, so cross-device overlap cannot be measured there: use the simulator
with measured chunk times. On CUDA the timers are CUDA events on the current stream (the CUDA
path is not yet exercised on hardware in this repository's tests).
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
from mhc_train.bench.model_step import VARIANTS
from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.parallel import simulator
from mhc_train.parallel.distributed import destroy_distributed, env_rank, init_distributed
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
    kind: str  # F B I W L (compute), post (p2p posting), wait (p2p wait), pair (an F&B pair)
    start: object  # clock marks; floats (seconds) once resolved
    end: object
    stage: int = -1
    mb: int = -1
    ops: tuple = ()  # wait: ((peer, is_send, seq), ...) of the messages waited for


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
        self.clock.start_step()
        self.start = self.clock.mark()
        self.active = True

    def end(self) -> dict:
        self.active = False
        stop = self.clock.mark()
        if isinstance(self.clock, CudaClock):
            torch.cuda.synchronize()
        res = self.clock.resolve
        return {"start": res(self.start), "end": res(stop),
                "spans": [(s.kind, res(s.start), res(s.end), s.stage, s.mb, s.ops) for s in self.spans],
                "posts": {k: res(t) for k, t in self.posts.items()}}


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
    rec.spans.append(Span("wait", start, rec.clock.mark(), ops=keys))


def install_p2p_hooks() -> None:
    """Route the runtime's (and the overlap handler's) p2p calls through the recorder; the
    schedules look these functions up in their module at call time."""
    torch_schedules._batch_p2p = _batch_p2p
    torch_schedules._wait_batch_p2p = _wait_batch_p2p
    overlap_module._wait_batch_p2p = _wait_batch_p2p


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


def ping_pong(shapes, dtype, device, rounds: int = PING_ROUNDS) -> list[tuple[float, float]]:
    """One-way time of one message of each shape between ranks 0 and 1, as (min, median) of
    round trip / 2 over ``rounds``; the shapes alternate round by round so that bursts of load
    hit them alike. The minimum is the pure transfer time. The other ranks wait at a barrier;
    rank 0's figures are the ones reported."""
    rank, out = dist.get_rank(), [(0.0, 0.0)] * len(shapes)
    if rank < 2:
        bufs, peer = [torch.zeros(s, dtype=dtype, device=device) for s in shapes], 1 - rank
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
    pipe: object
    n: int


def run_step(case: Case, tokens, targets, record: bool):
    for p in case.pipe.parameters():  # as zero_grad(set_to_none=True) before a training step
        p.grad = None
    dist.barrier()  # every rank starts the step together: the step is the schedule's makespan
    if record:
        RECORDER.begin()
    case.pipe.step(tokens, targets)
    return RECORDER.end() if record else None


# ---------------------------------------------------------------------------- analysis


def _union(intervals) -> float:
    total, reach = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > reach:
            total += e - max(s, reach)
            reach = e
    return total


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


def step_segments(parts: list[dict], offsets: list[float]) -> list[tuple[float, float, list]]:
    """Per rank of one step: (start, end, [(start, end, category), ...]) on rank 0's clock."""
    shifted = []
    for r, part in enumerate(parts):
        o = offsets[r]
        shifted.append({"start": part["start"] - o, "end": part["end"] - o,
                        "spans": [(k, s - o, e - o, *rest) for k, s, e, *rest in part["spans"]],
                        "posts": {key: t - o for key, t in part["posts"].items()}})
    out = []
    for r, part in enumerate(shifted):
        segments = []
        for kind, s, e, _stage, _mb, ops in part["spans"]:
            if kind in COMPUTE_KINDS:
                segments.append((s, e, "compute"))
            elif kind == "wait":
                # ready: the peer posted the other end of every message waited for; before it
                # this rank waits for the peer (bubble), after it for the transfer (exposed comm).
                ready = s
                for peer, is_send, seq in ops:
                    other = shifted[peer]["posts"].get((r, not is_send, seq)) if peer < len(shifted) else None
                    ready = max(ready, s if other is None else other)
                cut = min(ready, e)
                segments += [(s, cut, "bubble"), (cut, e, "exposed_comm")]
            elif kind == "post":
                segments.append((s, e, "exposed_comm"))
        out.append((part["start"], part["end"], segments))
    return out


def chunk_times(steps: list[list[dict]]) -> tuple[dict, list[float]]:
    """Durations per (kind, stage), the last stage's loss folded into its forward; and the
    compute time inside each F&B pair."""
    chunks: dict = defaultdict(list)
    pairs = []
    for parts in steps:
        for part in parts:
            loss = defaultdict(float)
            for kind, s, e, stage, mb, _ in part["spans"]:
                if kind == "L":
                    loss[(stage, mb)] += e - s
            compute = [(s, e) for kind, s, e, *_ in part["spans"] if kind in COMPUTE_KINDS]
            for kind, s, e, stage, mb, _ in part["spans"]:
                if kind in ("F", "B", "I", "W"):
                    chunks[(kind, stage)].append(e - s + (loss.get((stage, mb), 0.0) if kind == "F" else 0.0))
                elif kind == "pair":
                    pairs.append(_union([(max(a, s), min(b, e)) for a, b in compute if a < e and b > s]))
    return chunks, pairs


def per_stage(chunks: dict, kind: str, over_stages=statistics.mean) -> float | None:
    """Mean over micro-batches and steps per stage (so that the simulated compute is the measured
    compute, slow outliers included), then reduced over the stages (mean, or max: the slowest)."""
    means = [statistics.mean(v) for (k, _), v in chunks.items() if k == kind]
    return over_stages(means) if means else None


def sim_times(chunks: dict, pairs: list, message_s: float, over_stages=statistics.mean) -> simulator.Times:
    f, b, i, w = (per_stage(chunks, k, over_stages) for k in ("F", "B", "I", "W"))
    if b is None:  # a split backward only (zbv): its full backward is I + W
        b = (i or 0.0) + (w or 0.0)
    w = min(w or 0.0, b)
    fb = over_stages(pairs) if pairs else f + b  # no handler: the runtime runs F then B
    return simulator.Times(F=f, B=b, W=w, fb=fb, comm=message_s, n=1.0)


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
    slowest = run(sim_times(chunks, pairs, message_s, max))
    res_n1 = run(replace(times, comm=message_s_n1))
    return {"step_s": res.makespan, "idle_fraction": res.bubble_fraction,
            "rank_idle_fraction": [x / res.makespan for x in res.idle], "exposed_comm_s": res.exposed_comm,
            "step_s_slowest_stage": slowest.makespan, "step_s_n1_messages": res_n1.makespan,
            "times_s": {"F": times.F, "B": times.B, "W": times.W, "FB": times.fb, "message": message_s}}


def analyse(case_key, steps: list[list[dict]], offsets, tokens: int, ranks: int, microbatches: int,
            message: dict) -> tuple[dict, list]:
    per_rank = [{"steps": [], "totals": dict.fromkeys(CATEGORIES, 0.0)} for _ in range(ranks)]
    makespans, last = [], None
    for parts in steps:
        timeline = step_segments(parts, offsets)
        makespans.append(max(e for _, e, _ in timeline) - min(s for s, _, _ in timeline))
        for r, (start, end, segments) in enumerate(timeline):
            per_rank[r]["steps"].append(end - start)
            for c, v in categorize(segments, start, end).items():
                per_rank[r]["totals"][c] += v
        last = timeline
    chunks, pairs = chunk_times(steps)
    sim = simulated(case_key[1], ranks, microbatches, chunks, pairs, message["one_way_s"], message["one_way_s_n1"])
    rows = []
    for r, data in enumerate(per_rank):
        step = statistics.median(data["steps"])
        total = sum(data["steps"])
        rows.append({"rank": r, "step_s": step, "tokens_per_s": tokens / step,
                     "fractions": {c: v / total for c, v in data["totals"].items()},
                     "seconds_per_step": {c: v / len(data["steps"]) for c, v in data["totals"].items()}})
    all_total = sum(sum(d["steps"]) for d in per_rank)
    overall_step = statistics.median(makespans)
    overall = {"step_s": overall_step, "tokens_per_s": tokens / overall_step,
               "fractions": {c: sum(d["totals"][c] for d in per_rank) / all_total for c in CATEGORIES}}
    chunk_s = {k: per_stage(chunks, k) for k in ("F", "B", "I", "W")}
    chunk_s["FB"] = statistics.mean(pairs) if pairs else None
    return ({"residual": case_key[0], "schedule": case_key[1], "ranks": rows, "overall": overall,
             "chunk_s": chunk_s, "simulated": sim, "steps": len(steps)}, last)


# ------------------------------------------------------------------------------ report


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.3g}"


def table(header: str, messages: dict, results: list[dict]) -> str:
    head = ["residual", "schedule", "rank", "step ms", "tokens/s", "compute", "bubble", "exp.comm", "other",
            "F/B/I/W/F&B ms", "sim step ms", "sim slowest", "sim idle", "meas/sim"]
    rows = []
    for res in results:
        sim = res["simulated"] or {}
        for row in res["ranks"] + [dict(res["overall"], rank="all")]:
            overall = row["rank"] == "all"
            fr = row["fractions"]
            rank_idle = sim.get("rank_idle_fraction")
            idle = sim.get("idle_fraction") if overall else (rank_idle[row["rank"]] if rank_idle else None)
            rows.append([res["residual"], res["schedule"], str(row["rank"]), f"{row['step_s'] * 1e3:.1f}",
                         f"{row['tokens_per_s']:.0f}", *(f"{100 * fr[c]:.1f}%" for c in CATEGORIES),
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
    lines += ["  ".join(h.rjust(w) if i > 2 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths))),
              "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    effects = [f"{r['schedule']} {100 * (r['simulated']['step_s'] / r['simulated']['step_s_n1_messages'] - 1):+.2f}%"
               for r in results if r["simulated"] and messages[r["residual"]]["n"] > 1]
    if effects:
        lines.append("simulated step with n-stream messages vs n=1-size messages: " + ", ".join(effects))
    lines.append("bubble: waiting for data the peer had not posted yet; exp.comm: posting messages, and waiting "
                 "after the peer had posted (transfer not hidden); other: runtime work between chunks.")
    lines.append("sim: the simulator on the measured chunk times (mean per stage, averaged over the stages: "
                 "balanced stages, no runtime overhead) and the ping-pong message time; sim slowest: every stage at "
                 "the slowest stage's times; sim idle compares with bubble + exp.comm + other; meas/sim: step over "
                 "sim step.")
    return "\n".join(lines)


def chrome_trace(timelines: dict) -> dict:
    """The last profiled step of each case as a Chrome/Perfetto trace (one process per case)."""
    events = []
    for pid, (label, timeline) in enumerate(timelines.items()):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": label}})
        t0 = min(s for s, _, _ in timeline)
        for rank, (start, end, segments) in enumerate(timeline):
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
                "compute / bubble / exposed communication / other per rank, beside the simulator's ideal.",
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
    p.add_argument("--batch", type=int, default=16, help="sequences per step, split into the micro-batches")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="profiled steps per case")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="CPU threads per rank (default: torch's; torchrun sets 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report as JSON")
    p.add_argument("--trace", help="write the last profiled step of each case as a Chrome trace (JSON)")
    args = p.parse_args(argv)
    for name in ("microbatches", "batch", "seq", "steps"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise BenchError("--warmup must be >= 0 and --threads >= 1")
    return args


def plan(args, world: int):
    """Everything checkable before the process group exists (so every rank fails alike)."""
    schedules = list(dict.fromkeys(normalize_schedule_name(s) for s in args.schedule))
    cfg = load_model_config(args.model)
    stages = max(world * resolve_stages_per_rank(s, None) for s in schedules)
    layers = args.layers or max(cfg.n_layers, stages)
    cfg = load_model_config(args.model, n_layers=layers)
    if args.seq > cfg.max_seq_len:
        raise BenchError(f"--seq {args.seq} exceeds model.max_seq_len {cfg.max_seq_len}")
    for s in schedules:
        validate_pipeline(s, world, layers, args.microbatches, batch_size=args.batch)
    return schedules, cfg


def run(args, schedules, cfg, world: int) -> tuple[str, dict, dict]:
    global RECORDER
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    RECORDER = Recorder(CudaClock() if device.type == "cuda" else HostClock())
    install_p2p_hooks()
    mb = args.batch // args.microbatches
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1),
                         generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    tokens, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    cases = []
    for residual in args.residual:
        for schedule in schedules:
            torch.manual_seed(args.seed)  # the same model on every rank
            model = MHCTransformer(cfg, ResidualConfig(**VARIANTS[residual])).to(device).train()
            balance = args.balance if schedule in ("zbv", "dualpipev") else "stage"
            pipe = build_pipeline(model, schedule, args.microbatches, rank, world, microbatch_size=mb,
                                  seq_len=args.seq, device=device, balance=balance)
            instrument(pipe)
            cases.append(Case(residual, schedule, pipe, model.n_streams))
    dtype = next(cases[0].pipe.parameters()).dtype
    size = torch.empty((), dtype=dtype).element_size() * mb * args.seq * cfg.dim  # one stream
    ns = sorted({c.n for c in cases} | {1})
    # after every build, so that both ranks are idle and in step
    measured = dict(zip(ns, ping_pong([[mb, args.seq, n, cfg.dim] for n in ns], dtype, device)))
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
    records = {(c.residual, c.schedule): [] for c in cases}
    for _ in range(args.steps):  # interleaved rounds: noise hits every case alike
        for case in cases:
            records[(case.residual, case.schedule)].append(run_step(case, tokens, targets, record=True))

    gathered = [None] * world if rank == 0 else None
    dist.gather_object(records, gathered, dst=0)
    if rank != 0:
        return "", {}, {}
    results, timelines = [], {}
    for key in records:
        steps = [[gathered[r][key][i] for r in range(world)] for i in range(args.steps)]
        result, last = analyse(key, steps, offsets, args.batch * args.seq, world, args.microbatches,
                               messages[key[0]])
        result["stage_blocks"] = next(c.pipe.stage_blocks for c in cases if (c.residual, c.schedule) == key)
        results.append(result)
        timelines[f"{key[0]} {key[1]}"] = last
    dev = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU ({platform.processor() or platform.machine()})")
    config = {"model": args.model, "layers": cfg.n_layers, "batch": args.batch, "microbatches": args.microbatches,
              "microbatch_size": mb, "seq": args.seq, "ranks": world, "steps": args.steps, "warmup": args.warmup,
              "threads_per_rank": torch.get_num_threads(), "device": dev, "backend": dist.get_backend(),
              "torch": torch.__version__, "residuals": args.residual, "schedules": schedules,
              "balance": args.balance}
    header = (f"model={args.model} ({cfg.n_layers} blocks) batch={args.batch} ({args.microbatches} micro-batches "
              f"of {mb}) seq={args.seq} ranks={world} steps={args.steps} after {args.warmup} warm-up, device={dev}, "
              f"{torch.get_num_threads()} threads/rank, {dist.get_backend()}, torch={torch.__version__}, "
              f"V cut per {args.balance}")
    report = {"config": config, "messages": messages, "cases": results}
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
        schedules, cfg = plan(args, world)
    except (BenchError, PipelineConfigError, ValueError) as e:
        if rank == 0:  # every rank fails alike; one message is enough
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed(device_type=args.device)
    try:
        text, report, timelines = run(args, schedules, cfg, world)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
