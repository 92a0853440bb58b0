"""Pipeline schedule simulator: README bubble formulas, hand-traced timelines and an independent
longest-path reference, memory, dependencies, overlap, CLI."""

import itertools
import json
import re
from dataclasses import replace

import pytest

from mhc_train.parallel.simulator import formulas

from mhc_train.parallel.simulator import (
    OVERLAP_MODES,
    SCHEDULES,
    Op,
    Schedule,
    ScheduleDeadlock,
    SimulatorInputError,
    Times,
    build_schedule,
    evaluate,
    formula_bubble,
    main,
    simulate,
)


def _bubble(name, ranks, micro, times, overlap="on"):
    res = evaluate(name, ranks, micro, times, overlap=overlap, per="stage")
    return res, max(res.idle)


# --- the DualPipe README table (zero comm, equal chunk times) --------------------------------


@pytest.mark.parametrize("ranks,micro", [(2, 4), (3, 5), (4, 8), (8, 16), (4, 2)])
@pytest.mark.parametrize("F,B", [(1, 2), (2, 3), (1, 1)])
def test_1f1b_matches_formula(ranks, micro, F, B):
    t = Times(F=F, B=B, W=0.5)
    res, _ = _bubble("1f1b", ranks, micro, t, overlap="off")
    assert res.makespan == pytest.approx((micro + ranks - 1) * (F + B))
    assert res.idle == pytest.approx([(ranks - 1) * (F + B)] * ranks)
    assert formula_bubble("1f1b", ranks, t) == pytest.approx((ranks - 1) * (F + B))


@pytest.mark.parametrize("ranks,micro", [(2, 4), (4, 8), (4, 12), (6, 10)])
@pytest.mark.parametrize("F,B,W", [(1, 2, 1), (1, 1, 0.5), (2, 3, 1), (2, 5, 2)])
def test_zb1p_matches_formula_when_w_le_f(ranks, micro, F, B, W):
    t = Times(F=F, B=B, W=W)
    res, _ = _bubble("zb1p", ranks, micro, t)
    assert res.idle == pytest.approx([(ranks - 1) * (F + B - 2 * W)] * ranks)


# F = B - W and W <= F: the conditions under which the README formula is exact (docs/simulator.md)
DUAL_TIMES = [(1, 2, 1, None), (1, 2, 1, 2.5), (2, 3, 1, None), (2, 3, 1, 4.5), (2, 4, 2, 5.0),
              (3, 4, 1, None)]


@pytest.mark.parametrize("ranks,micro", [(2, 4), (3, 6), (4, 8), (4, 12), (6, 12), (8, 16)])
@pytest.mark.parametrize("F,B,W,fb", DUAL_TIMES)
def test_dualpipev_matches_formula(ranks, micro, F, B, W, fb):
    # PP = stages = 2 x ranks (the README's #devices = PP/2 row): (PP/2 - 1) = ranks - 1
    t = Times(F=F, B=B, W=W, fb=fb)
    res, bubble = _bubble("dualpipev", ranks, micro, t)
    pair = fb if fb is not None else F + B  # the default pair hides communication, not compute
    assert bubble == pytest.approx((ranks - 1) * (pair + B - 3 * W))
    assert bubble == pytest.approx(formula_bubble("dualpipev", ranks, t))
    assert res.idle[-1] == pytest.approx(bubble)  # the rank at the V's turn has the largest


@pytest.mark.parametrize("ranks,micro", [(2, 4), (4, 8), (6, 12), (8, 20)])
@pytest.mark.parametrize("F,B,W,fb", DUAL_TIMES)
def test_dualpipe_matches_formula(ranks, micro, F, B, W, fb):
    t = Times(F=F, B=B, W=W, fb=fb)
    _, bubble = _bubble("dualpipe", ranks, micro, t)
    assert bubble == pytest.approx((ranks / 2 - 1) * ((fb or F + B) + B - 3 * W))


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_formula_exact_wherever_its_conditions_hold(name):
    import itertools

    from mhc_train.parallel.simulator import formula_conditions

    for ranks, F, inp, W, extra in itertools.product((2, 4), (1, 2), (1, 2), (0.5, 1, 2), (0, 1)):
        t = Times(F=F, B=inp + W, W=W, fb=max(F, inp + W) + extra)
        if formula_conditions(name, t):
            continue
        _, bubble = _bubble(name, ranks, 3 * ranks, t, overlap="on")
        assert bubble == pytest.approx(formula_bubble(name, ranks, t)), (ranks, F, inp, W, extra)


def test_dualpipev_is_dualpipe_cut_in_half():
    t = Times(F=1, B=2.5, W=0.7)
    v = evaluate("dualpipev", 4, 12, t, per="stage")
    d = evaluate("dualpipe", 8, 24, t, per="stage")
    assert v.makespan == pytest.approx(d.makespan)
    assert v.idle == pytest.approx(d.idle[:4])


# --- independent references: hand-traced timelines and a from-scratch longest path -------------
#
# The deviation regimes (W > F or W > B - W for ZB1P, F != B - W for DualPipe(V)) were first found
# by running the simulator; here the simulator is checked against references that do not run it:
# (a) timelines traced by hand for 2 ranks, and (b) the earliest start of every op computed as a
# longest path through the dependency DAG (per-rank order from the Schedule, pipeline
# dependencies, links), written in this file.

_OP_RE = re.compile(r"([FBIW])(\d+)@s(\d+)(?:d(\d))?$")


def _key(text):
    """'F3@s0' -> ('F', 0, 0, 3): (kind, direction, stage, micro-batch), as SimResult.op_times."""
    kind, mb, stage, direction = _OP_RE.match(text).groups()
    return kind, int(direction or 0), int(stage), int(mb)


def _check_trace(res, sched, table):
    """Compare a simulation with a hand-traced table of rows `rank action start end [why]`.

    action: an op (F0@s1), a pair (F3@s0+B1@s3), `blocked` (the lane waiting for its own sends)
    or `F0@s0=>1` (the message carrying F0@s0's output from this rank to rank 1). Each rank's ops
    and pairs are listed in lane order; every compute, send and blocked interval must match."""
    ops, lane_order, sends, blocked = {}, {}, [], []
    for line in table.strip().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        rank, action, start, end = line.split(maxsplit=4)[:4]
        rank, start, end = int(rank), float(start), float(end)
        if action == "blocked":
            blocked.append((rank, start, end))
        elif "=>" in action:
            _, dst = action.split("=>")
            sends.append((rank, int(dst), start, end))
        else:
            lane_order.setdefault(rank, []).append(action)
            for part in action.split("+"):
                ops[_key(part)] = (rank, start, end)
    actual_order = {r: [str(a).strip("()") for a in acts] for r, acts in enumerate(sched.actions)}
    assert actual_order == lane_order
    assert res.op_times == ops
    assert sorted((iv.rank, iv.detail[0], iv.start, iv.end) for iv in res.intervals
                  if iv.lane == "comm") == sorted(sends)
    assert sorted((iv.rank, iv.start, iv.end) for iv in res.intervals
                  if iv.lane == "blocked") == sorted(blocked)
    assert res.makespan == max(end for _, _, end in ops.values())


# 1F1B, 2 ranks x 2 micro-batches, F = 1, B = 2, message 1.5 (longer than F: the link queues).
TRACE_1F1B_COMM_OVERLAPPED = """
# rank action    start end   why
0      F0@s0     0     1     first op
0      F1@s0     1     2     lane free at 1 (sends do not hold the lane)
0      B0@s0     7     9     gradient of B0@s1 arrives at 7
0      B1@s0     10    12    gradient of B1@s1 arrives at 10
0      F0@s0=>1  1     2.5   leaves at F0's end
0      F1@s0=>1  2.5   4     F1 ends at 2, but the link 0->1 carries a0 until 2.5: queued
1      F0@s1     2.5   3.5   activation a0 arrives at 2.5
1      B0@s1     3.5   5.5   last stage: the loss is local, needs only its own F
1      F1@s1     5.5   6.5   a1 arrived at 4, lane free at 5.5
1      B1@s1     6.5   8.5
1      B0@s1=>0  5.5   7
1      B1@s1=>0  8.5   10
"""

# The same without comm overlap: the lane waits until its own send is delivered.
TRACE_1F1B_COMM_BLOCKING = """
# rank action    start end   why
0      F0@s0     0     1
0      blocked   1     2.5   a0 on the link
0      F0@s0=>1  1     2.5
0      F1@s0     2.5   3.5
0      blocked   3.5   5
0      F1@s0=>1  3.5   5
0      B0@s0     7     9     g0 arrives at 7
0      B1@s0     11.5  13.5  g1 arrives at 11.5 (makespan 13.5)
1      F0@s1     2.5   3.5
1      B0@s1     3.5   5.5
1      blocked   5.5   7
1      B0@s1=>0  5.5   7
1      F1@s1     7     8     a1 arrived at 5, lane free at 7
1      B1@s1     8     10
1      blocked   10    11.5
1      B1@s1=>0  10    11.5
"""


def test_hand_traced_1f1b_messages_queue_and_block():
    t = Times(F=1, B=2, W=1, comm=1.5)
    sched = build_schedule("1f1b", 2, 2)
    on = simulate(sched, t, overlap_fb=False, overlap_comm=True)
    _check_trace(on, sched, TRACE_1F1B_COMM_OVERLAPPED)
    assert on.makespan == 12
    off = simulate(sched, t, overlap_fb=False, overlap_comm=False)
    _check_trace(off, sched, TRACE_1F1B_COMM_BLOCKING)
    assert off.makespan == 13.5 and off.blocked == [3.0, 3.0]


# ZB1P (ZB-H1), 2 ranks x 3 micro-batches, F = 1, B = 3, W = 2 (so I = B - W = 1 and W > F, I):
# rank 0 defers no W, rank 1 (the last) up to one, flushed at the end.
TRACE_ZB1P_W_GT_F = """
# rank action  start end  why
0      F0@s0   0     1
0      F1@s0   1     2
0      I0@s0   3     4    gradient of I0@s1 at 3 (rank 0 idles 2..3)
0      W0@s0   4     6    after its I
0      F2@s0   6     7
0      I1@s0   7     8    I1@s1 ended at 5, lane free at 7
0      W1@s0   8     10
0      I2@s0   10    11   I2@s1 ended at 9, lane free at 10
0      W2@s0   11    13
1      F0@s1   1     2    F0@s0 ends at 1 (rank 1 idles 0..1)
1      I0@s1   2     3    last stage: needs only its F
1      F1@s1   3     4    F1@s0 ended at 2
1      I1@s1   4     5
1      W0@s1   5     7    the deferred W0, 2 long, fills the wait for F2@s0
1      F2@s1   7     8    F2@s0 ends at 7: exactly when W0 is done
1      I2@s1   8     9
1      W1@s1   9     11
1      W2@s1   11    13
"""


def test_hand_traced_zb1p_deviation_when_w_exceeds_f_and_input_grad():
    t = Times(F=1, B=3, W=2)
    sched = build_schedule("zb1p", 2, 3)
    res = simulate(sched, t)
    _check_trace(res, sched, TRACE_ZB1P_W_GT_F)
    # Busy 3 x (F + I + W) = 12 on each rank, step 13: idle 1 on each (rank 0 at 2..3 waiting for
    # I0@s1, rank 1 at 0..1 waiting for F0@s0). The README's (PP - 1)(F + B - 2W) = 0 counts two
    # full W (4) against 1F1B's bubble F + B = 4, but the holes a W can fill are only F = 1 and
    # I = 1 long; docs/simulator.md's general (PP - 1)(F + I - min(W, F, I)) = 1 + 1 - 1 = 1.
    assert res.makespan == 13 and res.busy == [12, 12] and res.idle == [1, 1]
    assert formula_bubble("zb1p", 2, t) == 0


# DualPipeV, 2 ranks x 4 micro-batches (stages 0 and 3 on rank 0, 1 and 2 on rank 1; the loss on
# stage 3 = rank 0), per stage F = 2, B = 2, W = 1 (I = 1 < F), F&B pair 2 (as in the README's
# max(F, B)), overlap on, no messages. A pair starts when both its inputs are there and releases
# both outputs at its end.
TRACE_DUALPIPEV_F_GT_I = """
# rank action       start end  why
0      F0@s0        0     2
0      F1@s0        2     4
0      F2@s0        4     6
0      F0@s3        6     8    F0@s2 ends at 6
0      I0@s3        8     9    loss stage: needs only its F
0      W0@s3        9     10
0      F1@s3        10    12   F1@s2 ends at 10
0      F3@s0+B1@s3  12    14   B1@s3 needs F1@s3 (ends 12)
0      F2@s3+B0@s0  16    18   F2@s2 and B0@s1 both come from rank 1's pair ending at 16
0      B2@s3        18    20
0      F3@s3+B1@s0  20    22   F3@s2 and B1@s1 from rank 1's pair ending at 20
0      B3@s3        22    24
0      I2@s0        24    25   B2@s1 ends at 24
0      W2@s0        25    26
0      I3@s0        26    27   I3@s1 ends at 26
0      W3@s0        27    28
1      F0@s1        2     4    F0@s0 ends at 2
1      F0@s2        4     6    the V's turn is local
1      F1@s1        6     8
1      F1@s2        8     10
1      F2@s1        10    12
1      B0@s2        12    14   I0@s3 ended at 9, lane free at 12
1      F2@s2+B0@s1  14    16
1      F3@s1+B1@s2  16    18   F3@s0 and B1@s3 ended at 14
1      F3@s2+B1@s1  18    20
1      B2@s2        20    22   B2@s3 ends at 20
1      B2@s1        22    24
1      I3@s2        24    25   B3@s3 ends at 24
1      I3@s1        25    26
1      W3@s2        26    27
1      W3@s1        27    28
"""


def test_hand_traced_dualpipev_deviation_when_forward_exceeds_input_grad():
    t = Times(F=2, B=2, W=1, fb=2)
    sched = build_schedule("dualpipev", 2, 4)
    res = simulate(sched, t)
    _check_trace(res, sched, TRACE_DUALPIPEV_F_GT_I)
    # Busy from the table: rank 0 5 F (10) + I, W, 2 x (I, W) (6) + 3 pairs (6) + 2 B (4) = 26;
    # rank 1 5 F (10) + 3 B (6) + 3 pairs (6) + 2 I + 2 W (4) = 26. Idle 28 - 26 = 2 each.
    assert res.makespan == 28 and res.busy == [26, 26] and res.idle == [2, 2]
    # README: (PP/2 - 1)(F&B + B - 3W) = 1 x (2 + 2 - 3) = 1 < 2: the formula counts the warm-up
    # hops (F = 2 each here) like the cool-down hops (I = 1).
    assert formula_bubble("dualpipev", 2, t) == 1


def _placement(name, ranks):
    """(direction, stage) -> rank and stages per direction, from the schedules' definitions."""
    R = ranks
    if name in ("1f1b", "zb1p"):
        return {(0, s): s for s in range(R)}, R
    if name in ("zbv", "dualpipev"):  # V: down the ranks and back up; rank 0 has first and last
        return {(0, s): s if s < R else 2 * R - 1 - s for s in range(2 * R)}, 2 * R
    assert name == "dualpipe"  # direction 0 enters at rank 0, direction 1 at the last rank
    return {**{(0, s): s for s in range(R)}, **{(1, s): R - 1 - s for s in range(R)}}, R


def _reference(sched, F, B, W, *, msg=0.0, a2a_f=0.0, a2a_b=0.0, fb=None, fb_overhead=0.0,
               overlap_fb=True, overlap_comm=True):
    """Earliest start of every op, without the simulator: a longest path through the DAG of
    compute actions (each rank's in its Schedule order) and messages (one directed link per rank
    pair, FIFO in the sender's order; a pair sends its forward's output first).

    Edges: a rank's previous action (and, without comm overlap, that action's messages);
    F(s, m) <- F(s-1, m); B/I(s, m) <- F(s, m) and B/I(s+1, m); W(s, m) <- I(s, m). An output
    crossing ranks goes through a message node of duration msg (none when msg == 0).
    Returns (op -> (rank, start, end), makespan, busy per rank, messages (src, dst, start, end))."""
    rank_of, S = _placement(sched.name, sched.ranks)
    assert sched.rank_of == rank_of
    work = {"F": F, "B": B, "I": B - W, "W": W}
    a2a = {"F": a2a_f, "B": a2a_b, "I": a2a_b, "W": 0.0}
    dur, node_rank, node_ops = {}, {}, {}
    for r, acts in enumerate(sched.actions):
        lane = []
        for a in acts:
            if hasattr(a, "f") and overlap_fb:
                pair = fb if fb is not None else (
                    max(work[a.f.kind] + work[a.b.kind], a2a_f + a2a_b) + fb_overhead)
                lane.append(((a.f, a.b), pair))
            else:
                lane += [((o,), work[o.kind] + a2a[o.kind]) for o in ((a.f, a.b) if hasattr(a, "f")
                                                                     else (a,))]
        for i, (ops, d) in enumerate(lane):
            dur[("c", r, i)], node_rank[("c", r, i)], node_ops[("c", r, i)] = d, r, ops
    node_of = {(o.kind, o.direction, o.stage, o.mb): n for n, ops in node_ops.items() for o in ops}
    preds = {n: [] for n in dur}
    arrival, sends_of, link_last, links = {}, {}, {}, {}
    for n, ops in node_ops.items():  # insertion order = each rank's lane order
        r = node_rank[n]
        sends_of[n] = []
        for o in ops:
            k = (o.kind, o.direction, o.stage, o.mb)
            if o.kind == "F" and o.stage < S - 1:
                dst = rank_of[(o.direction, o.stage + 1)]
            elif o.kind in ("B", "I") and o.stage > 0:
                dst = rank_of[(o.direction, o.stage - 1)]
            else:
                continue
            if dst == r or msg == 0:
                arrival[k] = n
                continue
            m = ("m", k)
            dur[m], preds[m] = msg, [n] + ([link_last[(r, dst)]] if (r, dst) in link_last else [])
            link_last[(r, dst)], links[m] = m, (r, dst)
            sends_of[n].append(m)
            arrival[k] = m
    for n, ops in node_ops.items():
        _, r, i = n
        if i > 0:
            prev = ("c", r, i - 1)
            preds[n].append(prev)
            if not overlap_comm:
                preds[n] += sends_of[prev]
        for o in ops:
            d, s, mb = o.direction, o.stage, o.mb
            if o.kind == "F" and s > 0:
                preds[n].append(arrival[("F", d, s - 1, mb)])
            elif o.kind in ("B", "I"):
                preds[n].append(node_of[("F", d, s, mb)])
                if s < S - 1:
                    full = ("B", d, s + 1, mb)
                    grad = full if full in node_of else ("I", d, s + 1, mb)
                    preds[n].append(arrival[grad])
            elif o.kind == "W":
                preds[n].append(node_of[("I", d, s, mb)])
    # longest path in topological order (Kahn); a cycle would be a deadlock
    waiting = {n: len(p) for n, p in preds.items()}
    succ = {n: [] for n in preds}
    for n, p in preds.items():
        for q in p:
            succ[q].append(n)
    ready = [n for n, k in waiting.items() if k == 0]
    start, end = {}, {}
    while ready:
        n = ready.pop()
        start[n] = max((end[p] for p in preds[n]), default=0.0)
        end[n] = start[n] + dur[n]
        for q in succ[n]:
            waiting[q] -= 1
            if waiting[q] == 0:
                ready.append(q)
    assert len(end) == len(dur), "the reference found a dependency cycle (deadlock)"
    op_times = {(o.kind, o.direction, o.stage, o.mb): (node_rank[n], start[n], end[n])
                for n, ops in node_ops.items() for o in ops}
    busy = [0.0] * sched.ranks
    for n, r in node_rank.items():
        busy[r] += dur[n]
    makespan = max(end[n] for n in node_ops)
    messages = sorted((*links[m], start[m], end[m]) for m in links)
    return op_times, makespan, busy, messages


def _reference_for(name, ranks, micro, t: Times, overlap, per="stage"):
    """_reference with evaluate's inputs: per-rank times halve V-shape stages (not messages)."""
    k = 0.5 if per == "rank" and name in ("zbv", "dualpipev") else 1.0
    ofb, oc = OVERLAP_MODES[overlap]
    msg = t.latency + t.n * (t.comm or 0.0) if (t.comm or t.latency) else 0.0
    return _reference(build_schedule(name, ranks, micro), k * t.F, k * t.B, k * t.W, msg=msg,
                      a2a_f=k * t.a2a_f, a2a_b=k * t.a2a_b,
                      fb=None if t.fb is None else k * t.fb, fb_overhead=k * t.fb_overhead,
                      overlap_fb=ofb, overlap_comm=oc)


def test_reference_reproduces_the_hand_traces():
    # The reference is itself checked against the hand traces above.
    ops, makespan, busy, messages = _reference(build_schedule("zb1p", 2, 3), 1, 3, 2)
    assert (makespan, busy) == (13, [12, 12]) and ops[("W", 0, 1, 0)] == (1, 5, 7)
    ops, makespan, busy, _ = _reference(build_schedule("dualpipev", 2, 4), 2, 2, 1, fb=2)
    assert (makespan, busy) == (28, [26, 26]) and ops[("F", 0, 2, 2)] == (1, 14, 16)
    ops, makespan, _, messages = _reference(build_schedule("1f1b", 2, 2), 1, 2, 1, msg=1.5,
                                            overlap_fb=False)
    assert makespan == 12 and messages == [(0, 1, 1, 2.5), (0, 1, 2.5, 4), (1, 0, 5.5, 7),
                                           (1, 0, 8.5, 10)]
    _, makespan, _, _ = _reference(build_schedule("1f1b", 2, 2), 1, 2, 1, msg=1.5,
                                   overlap_fb=False, overlap_comm=False)
    assert makespan == 13.5


# per-stage (F, B, W): the README's picture and the regimes where its formulas deviate
GRID_FBW = [
    (1, 2, 1),  # F = B - W = W
    (1, 3, 1.5),  # W > F (ZB1P off its formula)
    (2, 3, 2),  # W > B - W, W = F
    (2, 2, 1),  # F > B - W (DualPipe(V) off)
    (1, 3, 1),  # F < B - W (DualPipe(V) off)
    (1, 3, 2),  # W > F = B - W (DualPipe(V) off, formula 0)
    (1.5, 2.5, 0.5),
]
# messages, expert all-to-all, given / default pair times
GRID_EXTRA = [
    {},
    dict(comm=0.25, n=3, latency=0.125),
    dict(comm=1.5),  # longer than a chunk: links queue
    dict(a2a_f=0.25, a2a_b=0.5, comm=0.25, n=2),
    dict(fb=2.5, a2a_f=0.5, a2a_b=0.5),
    dict(fb_overhead=0.25, a2a_f=1.0, a2a_b=1.5, comm=0.5),
]
GRID_SIZES = {"1f1b": [(2, 3), (4, 6)], "zb1p": [(2, 3), (4, 6)], "zbv": [(2, 3), (3, 7)],
              "dualpipev": [(2, 4), (3, 7)], "dualpipe": [(2, 4), (4, 8)]}


@pytest.mark.parametrize("name", SCHEDULES)
def test_simulator_equals_independent_longest_path(name):
    """Every op's start and end, the step time, busy time, messages and exposed comm equal the
    from-scratch longest path, over sizes x F/B/W regimes x overlap modes, each combination with
    one of the message / all-to-all / pair-time settings in turn (the full product is slow)."""
    # overlap "fb" = "off" and "on" = "comm" without pairs (docs/simulator.md)
    modes = list(OVERLAP_MODES) if name.startswith("dualpipe") else ["off", "comm"]
    for (z, (ranks, micro)), (i, (F, B, W)), (j, overlap) in itertools.product(
            enumerate(GRID_SIZES[name]), enumerate(GRID_FBW), enumerate(modes)):
        extra = GRID_EXTRA[(i + j + 3 * z) % len(GRID_EXTRA)]
        t = Times(F=F, B=B, W=W, **extra)
        per = ("stage", "rank")[(i + z) % 2]  # per rank: V shapes get half-size stages
        res = evaluate(name, ranks, micro, t, overlap=overlap, per=per)
        ops, makespan, busy, messages = _reference_for(name, ranks, micro, t, overlap, per)
        case = (ranks, micro, F, B, W, extra, overlap, per)
        assert res.op_times.keys() == ops.keys(), case
        for k, (r, start, end) in ops.items():
            assert res.op_times[k] == (r, pytest.approx(start), pytest.approx(end)), (case, k)
        assert res.makespan == pytest.approx(makespan), case
        assert res.busy == pytest.approx(busy), case
        assert sorted((iv.rank, iv.detail[0], iv.start, iv.end) for iv in res.intervals
                      if iv.lane == "comm") == [pytest.approx(m) for m in messages], case
        if messages:
            quiet = _reference_for(name, ranks, micro, replace(t, comm=0.0, latency=0.0),
                                   overlap, per)
            assert res.exposed_comm == pytest.approx(makespan - quiet[1]), case


@pytest.mark.parametrize("F,B,W", [(1, 3, 1.5), (2, 3, 2), (3, 5, 3), (1, 2, 1), (2, 5, 1)])
def test_zb1p_bubble_in_general(F, B, W):
    # docs/simulator.md: in general the ZB1P bubble is (PP - 1)(F + I - min(W, F, I)), I = B - W
    # (derived by hand on the 2-rank trace above); above the README's (PP - 1)(F + B - 2W) when
    # W > min(F, I). Checked on the independent longest path, 4 ranks x 8 micro-batches.
    t = Times(F=F, B=B, W=W)
    _, makespan, busy, _ = _reference_for("zb1p", 4, 8, t, "on")
    bubble = max(makespan - b for b in busy)
    inp = B - W
    assert bubble == pytest.approx(3 * (F + inp - min(W, F, inp)))
    if W > min(F, inp):
        assert bubble > formula_bubble("zb1p", 4, t)
    else:
        assert bubble == pytest.approx(formula_bubble("zb1p", 4, t))
    assert max(evaluate("zb1p", 4, 8, t, per="stage").idle) == pytest.approx(bubble)


# docs/simulator.md "Agreement with the README bubble table": every row, on the reference
AGREEMENT_TABLE = [  # schedule, ranks, micro, F, B, W, F&B, step time, simulated bubble, README
    ("1f1b", 4, 8, 1, 2, 1, None, 33, 9, 9),
    ("1f1b", 8, 16, 2, 3, 1, None, 115, 35, 35),
    ("1f1b", 8, 16, 1, 1, 0.5, None, 46, 14, 14),
    ("zb1p", 4, 8, 1, 2, 1, None, 27, 3, 3),
    ("zb1p", 8, 16, 2, 3, 1, None, 101, 21, 21),
    ("zb1p", 8, 16, 1, 3, 1.5, None, 74.5, 10.5, 7),
    ("dualpipe", 4, 8, 1, 2, 1, 2, 22, 1, 1),
    ("dualpipe", 8, 16, 2, 3, 1, 3, 75, 9, 9),
    ("dualpipe", 8, 16, 1, 2, 1, 2.5, 49, 4.5, 4.5),
    ("dualpipe", 8, 16, 2, 2, 1, 2, 56, 6, 3),
    ("dualpipev", 2, 4, 1, 2, 1, 2, 22, 1, 1),
    ("dualpipev", 4, 8, 1, 2, 1, 2, 44, 3, 3),
    ("dualpipev", 4, 16, 2, 3, 1, 3, 123, 9, 9),
    ("dualpipev", 8, 16, 1, 2, 1, 2.5, 99, 10.5, 10.5),
    ("dualpipev", 8, 16, 2, 3, 1, 3, 151, 21, 21),
    ("dualpipev", 4, 8, 2, 2, 1, 2, 56, 6, 3),
    ("dualpipev", 4, 8, 1, 3, 1, 3, 65, 8, 9),
    ("dualpipev", 4, 8, 1, 3, 2, 3, 60, 3, 0),
    # ZB-V has no README row; the doc gives its simulated bubbles (step times not stated)
    ("zbv", 4, 8, 1, 2, 1, None, None, 3, None),
    ("zbv", 4, 8, 1, 1, 0.5, None, None, 4, None),
    ("zbv", 4, 8, 2, 3, 1, None, None, 6, None),
    ("zbv", 8, 16, 1, 2, 1, None, None, 7, None),
    ("zbv", 8, 16, 1, 1, 0.5, None, None, 10, None),
    ("zbv", 8, 16, 2, 3, 1, None, None, 14, None),
]


@pytest.mark.parametrize("name,ranks,micro,F,B,W,fb,step,bubble,readme", AGREEMENT_TABLE)
def test_documented_agreement_table_on_the_reference(name, ranks, micro, F, B, W, fb, step,
                                                     bubble, readme):
    t = Times(F=F, B=B, W=W, fb=fb)
    _, makespan, busy, _ = _reference_for(name, ranks, micro, t, "on")
    step = makespan if step is None else step
    assert makespan == pytest.approx(step)
    assert max(makespan - b for b in busy) == pytest.approx(bubble)
    if readme is None:
        assert formula_bubble(name, ranks, t) is None
    else:
        assert formula_bubble(name, ranks, t) == pytest.approx(readme)
    res = evaluate(name, ranks, micro, t, per="stage")
    assert (res.makespan, max(res.idle)) == (pytest.approx(step), pytest.approx(bubble))


# --- memory ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [2, 4, 6])
def test_peak_activation_memory(ranks):
    t = Times(F=1, B=2, W=1)
    m = 3 * ranks
    assert evaluate("1f1b", ranks, m, t).peak_memory == list(range(ranks, 0, -1))
    assert evaluate("zb1p", ranks, m, t).peak_memory == [ranks] * ranks
    # V shapes count activations of half-size stages: 2 x ranks = PP stages
    assert evaluate("zbv", ranks, m, t).peak_memory == [2 * ranks] * ranks
    assert evaluate("dualpipev", ranks, m, t).peak_memory == [2 * ranks + 1] * ranks
    assert evaluate("dualpipe", ranks, 2 * m, t).peak_memory == [ranks + 1] * ranks


# --- semantics ---------------------------------------------------------------------------------


def _check_dependencies(sched: Schedule, res, msg: float):
    times = res.op_times
    expected = {(o.kind, *o.key) for _, o in sched.ops()}
    assert set(times) == expected
    assert len(expected) == sum(1 for _ in sched.ops())  # no duplicates
    per_dir = sched.microbatches // (2 if sched.name == "dualpipe" else 1)
    dirs = 2 if sched.name == "dualpipe" else 1
    S = sched.num_stages
    for d in range(dirs):
        for s in range(S):
            for m in range(per_dir):
                assert ("F", d, s, m) in times
                split = ("I", d, s, m) in times
                assert split != (("B", d, s, m) in times)
                assert split == (("W", d, s, m) in times)
    for (kind, d, s, m), (r, start, end) in times.items():
        assert sched.rank_of[(d, s)] == r

        def after(key, hop_from):
            pr, _, pend = times[key]
            assert start >= pend + (msg if pr != hop_from else 0) - 1e-9, (kind, d, s, m, key)

        if kind == "F" and s > 0:
            after(("F", d, s - 1, m), r)
        if kind in ("B", "I"):
            assert start >= times[("F", d, s, m)][2] - 1e-9
            if s < S - 1:
                key = ("I", d, s + 1, m) if ("I", d, s + 1, m) in times else ("B", d, s + 1, m)
                after(key, r)
        if kind == "W":
            assert start >= times[("I", d, s, m)][2] - 1e-9
    # one compute lane per rank, one link per ordered rank pair
    lanes: dict = {}
    for iv in res.intervals:
        key = (iv.rank, "compute") if iv.lane != "comm" else (iv.rank, iv.detail[0])
        lanes.setdefault(key, []).append((iv.start, iv.end))
    for spans in lanes.values():
        spans.sort()
        for (_, e0), (s1, _) in zip(spans, spans[1:]):
            assert s1 >= e0 - 1e-9


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("overlap", list(OVERLAP_MODES))
def test_every_action_once_and_dependencies_respected(name, overlap):
    ranks, micro = 4, 10
    t = Times(F=1, B=2.2, W=0.8, comm=0.3, n=2)
    sched = build_schedule(name, ranks, micro)
    res = evaluate(name, ranks, micro, t, overlap=overlap)
    _check_dependencies(sched, res, res.message_time)


@pytest.mark.parametrize("name", SCHEDULES)
def test_small_and_odd_sizes_do_not_deadlock(name):
    for ranks in range(1, 6):
        for micro in range(1, 2 * ranks + 3):
            try:
                sched = build_schedule(name, ranks, micro)
            except SimulatorInputError:
                continue
            res = simulate(sched, Times(comm=0.2))
            _check_dependencies(sched, res, res.message_time)


def test_deadlock_is_detected():
    sched = build_schedule("1f1b", 2, 2)
    sched.actions[0] = [Op("B", 0, 0), Op("F", 0, 0), Op("F", 0, 1), Op("B", 0, 1)]
    with pytest.raises(ScheduleDeadlock, match="rank 0: B0@s0"):
        simulate(sched, Times())


def test_action_lists_match_torch_schedules():
    from types import SimpleNamespace

    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")

    def torch_ops(acts):
        out = []
        for a in acts:
            if a is None or a.computation_type == schedules.REDUCE_GRAD:
                continue
            if a.computation_type == schedules.OVERLAP_F_B:
                out.append(tuple((s.computation_type.value, s.stage_index, s.microbatch_index)
                                 for s in a.sub_actions))
            else:
                out.append((a.computation_type.value, a.stage_index, a.microbatch_index))
        return out

    def ours(acts):
        return [tuple((o.kind, o.stage, o.mb) for o in (a.f, a.b)) if hasattr(a, "f")
                else (a.kind, a.stage, a.mb) for a in acts]

    for ranks, micro in [(2, 4), (3, 7), (4, 8), (4, 11)]:
        ns = SimpleNamespace(pp_group_size=ranks, _n_microbatches=micro, num_stages=2 * ranks)
        for name, cls in [("zbv", schedules.ScheduleZBVZeroBubble),
                          ("dualpipev", schedules.ScheduleDualPipeV)]:
            sched = build_schedule(name, ranks, micro)
            for r in range(ranks):
                assert ours(sched.actions[r]) == torch_ops(
                    cls._calculate_single_rank_operations(ns, r)), (name, ranks, micro, r)
        ns1 = SimpleNamespace(_num_stages=ranks, _n_microbatches=micro)
        order = schedules.Schedule1F1B._get_pipeline_order(ns1)
        sched = build_schedule("1f1b", ranks, micro)
        # torch's 1F1B IR (used for its dry-run/plots, not execution) starts the last rank's
        # steady phase at micro-batch 1 (forward_mb += 1 before the first use): skip that rank
        for r in range(ranks - 1):
            assert ours(sched.actions[r]) == torch_ops(order[r]), ("1f1b", ranks, micro, r)


# --- overlap and the n-fold messages -------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
def test_overlap_never_slower(name):
    for F, B, W in [(1, 2, 1), (1, 3, 1), (2, 2, 0.5)]:
        for comm in (0.0, 0.1, 0.5, 2.0):
            for a2a in (0.0, 0.3, 1.5):
                t = Times(F=F, B=B, W=W, comm=comm, a2a_f=a2a, a2a_b=a2a)
                step = {ov: evaluate(name, 4, 8, t, overlap=ov).makespan for ov in OVERLAP_MODES}
                # overlapping the stage messages never costs; pairing may (test below)
                assert step["comm"] <= step["off"] + 1e-9
                assert step["on"] <= step["fb"] + 1e-9


def test_pairs_gain_only_by_hiding_all_to_all():
    """Without expert all-to-all the default pair is F + B: DualPipeV's pairs gain nothing and even
    cost (a pair waits for both its chunks' inputs; the issue's 51 vs 49.5 at 4 ranks x 16
    micro-batches); with all-to-all, a pair hides each chunk's behind the other's compute."""
    plain = Times(F=1, B=2, W=1)
    paired = evaluate("dualpipev", 4, 16, plain, overlap="fb").makespan
    unpaired = evaluate("dualpipev", 4, 16, plain, overlap="off").makespan
    assert (paired, unpaired) == (pytest.approx(51.0), pytest.approx(49.5))
    ep = Times(F=1, B=2, W=1, a2a_f=0.4, a2a_b=0.8)
    assert ep.pair_time(formulas._PAIR) == pytest.approx(3.0)  # the all-to-all is hidden
    assert ep.op_time("F") == pytest.approx(1.4) and ep.op_time("I") == pytest.approx(1.8)
    assert evaluate("dualpipev", 4, 16, ep, overlap="fb").makespan < evaluate(
        "dualpipev", 4, 16, ep, overlap="off").makespan


@pytest.mark.parametrize("name", SCHEDULES)
def test_larger_n_costs_more_without_comm_overlap(name):
    t = Times(F=1, B=2, W=1, comm=0.1)

    def step(n, overlap):
        return evaluate(name, 4, 16, Times(**{**t.__dict__, "n": n}), overlap=overlap).makespan

    for with_ov, without in [("on", "fb"), ("comm", "off")]:
        cost_with = step(4, with_ov) - step(1, with_ov)
        cost_without = step(4, without) - step(1, without)
        assert cost_with > 0
        assert cost_without >= cost_with - 1e-9
    assert step(4, "off") - step(1, "off") > step(4, "comm") - step(1, "comm")


def test_message_time_from_bytes_and_bandwidth():
    t = Times(message_bytes=8e6, bandwidth=4e7, latency=0.01, n=4)
    assert t.message_time == pytest.approx(0.01 + 4 * 0.2)


def test_exposed_comm_zero_without_messages():
    res = evaluate("dualpipev", 4, 8, Times())
    assert res.exposed_comm == 0 and res.message_time == 0


# --- outputs and the command line ----------------------------------------------------------------


def test_png_written(tmp_path):
    from mhc_train.parallel.timeline_plot import plot_timelines

    results = [evaluate(s, 2, 4, Times(comm=0.1, n=4), overlap=ov)
               for s, ov in (("1f1b", "off"), ("dualpipev", "on"))]
    (one,) = plot_timelines(results, tmp_path / "all.png")
    assert one.stat().st_size > 10_000
    many = plot_timelines(results, tmp_path / "{schedule}_{overlap}.png")
    assert sorted(p.name for p in many) == ["1f1b_off.png", "dualpipev_on.png"]
    assert all(p.stat().st_size > 5_000 for p in many)


def test_cli_table_and_png(tmp_path, capsys):
    png = tmp_path / "out.png"
    js = tmp_path / "out.json"
    rc = main(["--ranks", "2", "--microbatches", "4", "--F", "1", "--B", "2", "--W", "1",
               "--comm", "0.1", "--schedules", "1f1b,zbv,dualpipev", "--overlap", "both",
               "--n", "4", "--png", str(png), "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("1F1B", "ZB-V", "DualPipeV", "step time", "bubble %", "exposed comm"):
        assert word in out
    assert png.stat().st_size > 10_000
    data = json.loads(js.read_text())
    assert len(data["results"]) == 6


def test_cli_compare_n(capsys):
    assert main(["--compare-n", "1,4", "--comm", "0.2", "--schedules", "1f1b,dualpipev"]) == 0
    out = capsys.readouterr().out
    assert "step vs n=1" in out and out.count("DualPipeV") == 4


def test_cli_config_file(tmp_path, capsys):
    cfg = tmp_path / "times.yaml"
    cfg.write_text("ranks: 2\nmicrobatches: 4\nF: 1\nB: 2\nW: 1\nschedules: [1f1b]\n"
                   "overlap: off\nper: stage\n")
    assert main(["--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "1F1B" in out and "  15  " in out  # (4 + 2 - 1) x 3


@pytest.mark.parametrize("argv,needle", [
    (["--schedules", "dualpipev", "--ranks", "4", "--microbatches", "6"], ">= stages"),
    (["--schedules", "dualpipe", "--ranks", "3", "--microbatches", "12"], "even number of ranks"),
    (["--F", "-1"], "F must be > 0"),
    (["--W", "3", "--B", "2"], "cannot exceed"),
    (["--comm", "-0.1"], "comm must be >= 0"),
    (["--schedules", "gpipe"], "unknown schedule"),
    (["--overlap", "sometimes"], "unknown overlap mode"),
    (["--ranks", "four"], "invalid int value"),
    (["--compare-n", "1,4"], "needs a message time"),
    (["--n", "0.5", "--comm", "1"], "n must be >= 1"),
])
def test_cli_bad_input_one_line_exit_2(argv, needle, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and needle in err, err


def test_library_validation():
    with pytest.raises(SimulatorInputError):
        build_schedule("dualpipev", 4, 7)
    with pytest.raises(SimulatorInputError):
        evaluate("1f1b", 2, 2, Times(B=-1))
