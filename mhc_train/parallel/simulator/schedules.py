"""Pipeline schedules as per-rank action lists: 1F1B, ZB1P (ZB-H1), ZB-V, DualPipe, DualPipeV.

Pure data: no times, no simulation. ``build_schedule`` checks each schedule's requirements
(``SimulatorInputError``) and returns a :class:`Schedule`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator, Union

SCHEDULES = ("1f1b", "zb1p", "zbv", "dualpipe", "dualpipev")
SCHEDULE_TITLES = {
    "1f1b": "1F1B",
    "zb1p": "ZB1P (ZB-H1)",
    "zbv": "ZB-V",
    "dualpipe": "DualPipe",
    "dualpipev": "DualPipeV",
}


class SimulatorInputError(ValueError):
    """Impossible input (times, counts, schedule requirements); the CLI prints it and exits 2."""


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
    r weight-gradient chunks deferred, which fills the cool-down bubble, and flushes them
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
