"""mhc-train-bench-pipeline: the report's structure and invariants (never its timings), the
bubble / exposed-communication split on a hand-made timeline, and its one-line errors."""

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


def test_errors_are_one_line(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "0")
    assert pp.main(["--model", "tiny"]) == 2
    assert "needs torchrun with >= 2 ranks" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert pp.main(["--model", "tiny", "--schedule", "dualpipev", "--microbatches", "2", "--batch", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "parallel.pipeline.microbatches: dualpipev needs" in err


def test_profile_report_on_2_ranks(tmp_path):
    report_path, trace_path = tmp_path / "report.json", tmp_path / "trace.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mhc_train.bench.pipeline_profile", "--model", "tiny", "--residual", "baseline", "mhc",
           "--schedule", "1f1b", "dualpipev", "--microbatches", "4", "--batch", "4", "--seq", "16",
           "--steps", "2", "--warmup", "1", "--json", str(report_path), "--trace", str(trace_path)]
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
