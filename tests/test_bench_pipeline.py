"""mhc-train-bench-pipeline: the report's structure and invariants (never its timings), the
bubble / exposed-communication split and the hidden-communication fraction on hand-made
timelines, and its one-line errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from mhc_train.bench import pipeline_profile as pp

ROOT = Path(__file__).resolve().parents[1]


def test_split_of_a_wait_into_bubble_and_exposed_comm():
    # Rank 0 waits [1, 5] for the activation rank 1 sends; rank 1 posts it at 3: the first 2 s
    # the peer had not produced it (bubble), the last 2 s the transfer ran (exposed comm).
    rank0 = {"start": 0.0, "end": 6.0, "posts": {(1, False, 0): 0.5},
             "spans": [("F", 0.0, 1.0, 0, 0, ()), ("wait", 1.0, 5.0, -1, -1, ((1, False, 0),)),
                       ("B", 5.0, 5.5, 0, 0, ())]}
    rank1 = {"start": 0.0, "end": 6.0, "posts": {(0, True, 0): 3.0}, "spans": [("post", 3.0, 3.25, -1, -1, ())]}
    (s0, e0, seg0), (s1, e1, seg1) = pp.step_segments([rank0, rank1], [0.0, 0.0])
    assert pp.categorize(seg0, s0, e0) == {"compute": 1.5, "bubble": 2.0, "exposed_comm": 2.0, "other": 0.5}
    assert pp.categorize(seg1, s1, e1)["exposed_comm"] == 0.25  # posting is communication work
    # Overlapping categories: compute wins over exposed comm over bubble; the rest is other.
    assert pp.categorize([(0, 2, "bubble"), (1, 3, "exposed_comm"), (2, 4, "compute")], 0, 5) == {
        "compute": 2, "bubble": 1, "exposed_comm": 1, "other": 1}


def test_comm_hidden_fraction_arithmetic():
    # The rank computes over [0, 10]; one communication in flight over [2, 4] each time.
    def one(blocked, exposed=None):
        res = pp.comm_overlap([(0, 10)], {"a2a": blocked}, {"a2a": [(2, 4)]},
                              None if exposed is None else {"a2a": exposed})["a2a"]
        return res["hidden_s"], res["exposed_s"], pp.hidden_fraction(res)

    assert one([]) == (2, 0, 1.0)  # entirely hidden: the rank computed while it travelled
    assert one([(2, 4)]) == (0, 2, 0.0)  # entirely exposed: the rank waited for it
    assert one([(3, 5)]) == (1, 1, 0.5)  # half computed over, half waited for
    # Blocked on [1, 3] but waiting for a peer until 3 (not for this transfer): not exposed, not hidden.
    assert one([(1, 3)], exposed=[(3, 3)]) == (1, 0, 0.5)

    # Two kinds: "all" counts time with both in flight once; blocked on one kind is not computing.
    res = pp.comm_overlap([(0, 10), (12, 14)], {"a2a": [(6, 8)], "p2p": []},
                          {"a2a": [(1, 3), (6, 8)], "p2p": [(2, 7), (11, 13)]})
    assert res["a2a"] == {"in_flight_s": 4, "hidden_s": 2, "exposed_s": 2}
    assert res["p2p"] == {"in_flight_s": 7, "hidden_s": 4 + 1, "exposed_s": 0}  # [6, 7] blocked on the a2a
    assert res["all"] == {"in_flight_s": 9, "hidden_s": 2 + 3 + 1, "exposed_s": 2}
    assert pp.hidden_fraction({"in_flight_s": 0, "hidden_s": 0}) is None


def test_comm_in_flight_from_recorded_steps():
    # Ranks 0 and 1 form an EP group and exchange one pipeline message (0 -> 1); both compute [0, 10].
    # All-to-all: rank 0 issues at 2, rank 1 at 3 (ready at 3), done at 5. Rank 0 waits [4, 6] (it
    # computed [3, 4] while the rows travelled), rank 1 waits [3, 5] (all of it exposed).
    # Message: rank 1 posts its receive at 1, rank 0 its send at 7 (posting [7, 7.1]); rank 1 waits
    # [8, 9]; rank 0 waits for the send at the step's end, [10, 11]: it was done when rank 1 had it, at 9.
    rank0 = {"start": 0.0, "end": 11.0, "posts": {(1, True, 0): 7.0},
             "a2a": [("dispatch", "F", 2.0, 5.0, 4.0, 6.0)],
             "spans": [("F", 0.0, 10.0, 0, 0, ()), ("post", 7.0, 7.1, -1, -1, ()),
                       ("wait", 10.0, 11.0, -1, -1, ((1, True, 0),))]}
    rank1 = {"start": 0.0, "end": 11.0, "posts": {(0, False, 0): 1.0},
             "a2a": [("dispatch", "F", 3.0, 5.0, 3.0, 5.0)],
             "spans": [("F", 0.0, 10.0, 1, 0, ()), ("wait", 8.0, 9.0, -1, -1, ((0, False, 0),))]}
    v0, v1 = pp.step_view([rank0, rank1], [0.0, 0.0], [[0, 1], [0, 1]])
    assert v0.in_flight == v1.in_flight == {"a2a": [(3.0, 5.0)], "counts": [], "p2p": [(7.0, 9.0)]}
    c0 = pp.comm_overlap(v0.compute, v0.blocked, v0.in_flight, v0.exposed)
    c1 = pp.comm_overlap(v1.compute, v1.blocked, v1.in_flight, v1.exposed)
    assert (c0["a2a"]["hidden_s"], c0["a2a"]["exposed_s"]) == (1.0, 1.0)
    assert (c1["a2a"]["hidden_s"], c1["a2a"]["exposed_s"]) == (0.0, 2.0)
    assert math.isclose(c0["p2p"]["hidden_s"], 1.9) and math.isclose(c0["p2p"]["exposed_s"], 0.1)  # posting
    assert (c1["p2p"]["hidden_s"], c1["p2p"]["exposed_s"]) == (1.0, 1.0)
    # The step's categories count the waits as such, not as the compute spans around them.
    assert pp.categorize(v1.segments, v1.start, v1.end) == {"compute": 7.0, "bubble": 0.0, "exposed_comm": 3.0,
                                                            "other": 1.0}


def test_simulator_inputs_split_chunks_into_compute_and_all_to_all():
    """Per chunk: its all-to-alls in flight (issue to completion) and the time it was blocked on
    them; the simulator gets compute-only F / B, a2a_f / a2a_b and the measured pair time."""
    part = {"start": 0.0, "end": 20.0, "posts": {},
            # F chunk [0, 8]: a dispatch issued at 1, done at 4, waited [3, 4]; a combine issued at
            # 5, done at 6, never blocked. B chunk [8, 18]: one issued at 10, done at 13, waited [11, 13].
            "a2a": [("dispatch", "F", 1.0, 4.0, 3.0, 4.0), ("combine", "F", 5.0, 6.0, 6.0, 6.0),
                    ("combine.backward", "B", 10.0, 13.0, 11.0, 13.0)],
            "spans": [("F", 0.0, 8.0, 0, 0, ()), ("B", 8.0, 18.0, 1, 0, ()), ("pair", 0.0, 18.0, -1, -1, ())]}
    chunks, pairs = pp.chunk_times([[part]])
    assert chunks[("F_a2a", 0)] == [4.0] and chunks[("F_blocked", 0)] == [1.0]
    assert chunks[("B_a2a", 1)] == [3.0] and chunks[("B_blocked", 1)] == [2.0]
    times = pp.sim_times(chunks, pairs, message_s=0.5)
    assert (times.F, times.B, times.a2a_f, times.a2a_b) == (7.0, 8.0, 4.0, 3.0)
    assert times.fb == pairs[0] == 18.0 and times.comm == 0.5


def test_errors_are_one_line(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "0")
    assert pp.main(["--model", "tiny"]) == 2
    assert "needs torchrun with >= 2 ranks" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert pp.main(["--model", "tiny", "--schedule", "dualpipev", "--microbatches", "2", "--batch", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "parallel.pipeline.microbatches: dualpipev needs" in err
    for world, ep, message in [(4, 3, "--ep 3 must divide the world of 4 ranks"),
                               (4, 4, "needs >= 2 pipeline ranks: the world of 4 ranks / --ep 4 = 1"),
                               (6, 3, "parallel.ep: 3 must divide model.n_routed_experts=8")]:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        assert pp.main(["--model", "tiny", "--ep", str(ep)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_profile_report_on_2_ranks(tmp_path):
    report_path, trace_path, png_path = tmp_path / "report.json", tmp_path / "trace.json", tmp_path / "t.png"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mhc_train.bench.pipeline_profile", "--model", "tiny", "--residual", "baseline", "mhc",
           "--schedule", "1f1b", "dualpipev", "--microbatches", "4", "--batch", "4", "--seq", "16",
           "--steps", "2", "--warmup", "1", "--json", str(report_path), "--trace", str(trace_path),
           "--png", str(png_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "sim step ms" in proc.stdout and "dualpipev" in proc.stdout

    report = json.loads(report_path.read_text())
    config = report["config"]
    assert config["ranks"] == 2 and config["layers"] == 4  # tiny's 3 blocks raised to dualpipev's 4 stages
    base, mhc = report["messages"]["baseline"], report["messages"]["mhc"]
    assert (base["n"], mhc["n"]) == (1, 4) and mhc["bytes"] == 4 * base["bytes"] == 4 * mhc["bytes_n1"]
    assert base["shape"] == [1, 16, 1, 64] and min(base["one_way_s"], mhc["one_way_s"], mhc["one_way_s_n1"]) > 0

    cases = {(c["residual"], c["schedule"]): c for c in report["cases"]}
    assert set(cases) == {(r, s) for r in ("baseline", "mhc") for s in ("1f1b", "dualpipev")}
    for (residual, schedule), case in cases.items():
        assert case["steps"] == 2
        assert [row["rank"] for row in case["ranks"]] == [0, 1]
        for row in case["ranks"] + [case["overall"]]:
            assert row["step_s"] > 0 and row["tokens_per_s"] > 0
            fractions = row["fractions"]
            assert set(fractions) == set(pp.CATEGORIES)
            assert all(0 <= v <= 1 for v in fractions.values()), fractions
            assert math.isclose(sum(fractions.values()), 1, abs_tol=1e-6), fractions
            assert fractions["compute"] > 0
        # the step across ranks (first start to last end) is no shorter than any rank's own
        assert case["overall"]["step_s"] >= max(row["step_s"] for row in case["ranks"]) - 1e-9
        chunks = case["chunk_s"]
        assert chunks["F"] > 0 and chunks["B"] > 0
        if schedule == "dualpipev":  # the overlap handler's F&B pairs were timed
            assert chunks["FB"] > 0
        sim = case["simulated"]
        assert min(sim["step_s"], sim["step_s_slowest_stage"], sim["step_s_n1_messages"]) > 0
        assert 0 <= sim["idle_fraction"] < 1
        assert len(sim["rank_idle_fraction"]) == 2

    trace = json.loads(trace_path.read_text())["traceEvents"]
    assert {e["name"] for e in trace if e["ph"] == "X"} >= {"step", "compute"}
    assert png_path.read_bytes()[:4] == b"\x89PNG"  # no all-to-all, 1f1b without pairs: drawn all the same


def test_overlap_on_off_under_expert_parallelism(tmp_path):
    """pp=2 x ep=2 on 4 processes, DualPipeV with the overlap on and off: the hidden fraction of
    every rank, the communication of both kinds, and the timeline picture."""
    report_path, png_path = tmp_path / "report.json", tmp_path / "timeline.png"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           "-m", "mhc_train.bench.pipeline_profile", "--model", "tiny", "--residual", "mhc", "--schedule", "dualpipev",
           "--ep", "2", "--overlap", "on", "off", "--microbatches", "4", "--batch", "4", "--seq", "16",
           "--steps", "1", "--warmup", "1", "--json", str(report_path), "--png", str(png_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "hid a2a/cnt/p2p" in proc.stdout

    report = json.loads(report_path.read_text())
    config = report["config"]
    assert (config["ranks"], config["pp"], config["ep"]) == (4, 2, 2)
    assert [(r["pp_rank"], r["dp_rank"]) for r in config["rank_roles"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    cases = {c["overlap"]: c for c in report["cases"]}
    assert set(cases) == {"on", "off"} and all(c["schedule"] == "dualpipev" for c in cases.values())
    for case in cases.values():
        assert [row["rank"] for row in case["ranks"]] == [0, 1, 2, 3]
        for row in case["ranks"] + [case["overall"]]:
            assert 0 <= row["comm_hidden_fraction"] <= 1, row
            comm = row["comm"]
            assert set(comm) == set(pp.COMM_KINDS) | {"all"}
            for kind in ("a2a", "counts", "p2p"):  # every rank holds MoE layers and a pipeline link
                assert comm[kind]["in_flight_s"] > 0, (kind, comm)
            for seconds in comm.values():
                assert seconds["hidden_s"] + seconds["exposed_s"] <= seconds["in_flight_s"] * (1 + 1e-9)
            assert comm["counts"]["hidden_s"] == 0  # a blocking exchange: never hidden
            assert math.isclose(sum(row["fractions"].values()), 1, abs_tol=1e-6)
        assert case["chunk_s"]["FB"] > 0 and case["simulated"]["step_s"] > 0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
