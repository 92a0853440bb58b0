"""The MoE step benchmark: its report's structure, and its refusal to time impls that disagree (the
timings themselves are not tested)."""

import json
import math

import pytest

from mhc_train.bench import moe_step
from mhc_train.model.moe import RoutedExperts

ARGS = ["--widths", "tiny", "--tokens", "48", "--rounds", "2", "--warmup", "1", "--device", "cpu"]


def test_json_report(tmp_path, capsys):
    path = tmp_path / "out" / "bench_moe.json"
    moe_step.main([*ARGS, "--json", str(path)])
    report = json.loads(path.read_text())
    assert {"device", "torch", "threads", "date", "command", "dtype", "rounds", "warmup", "results"} <= report.keys()
    assert report["command"].startswith("python -m mhc_train.bench.moe_step --widths tiny")
    rows = report["results"]
    assert [(r["width"], r["tokens"], r["impl"]) for r in rows] == [("tiny", 48, "grouped"), ("tiny", 48, "loop")]
    for r in rows:
        assert (r["dim"], r["moe_ffn_dim"], r["experts"], r["top_k"]) == (64, 32, 8, 2)
        assert len(r["ms_all"]) == 2 and all(math.isfinite(t) and t > 0 for t in r["ms_all"])
        assert r["ms_min"] == min(r["ms_all"]) and r["ms_min"] <= r["ms_median"]
        assert r["max_rel_diff"] <= 1e-5 and r["auto_picks"] == "grouped"
    assert rows[1]["loop_over_impl_median"] == rows[1]["loop_over_impl_paired"] == 1.0
    out = capsys.readouterr().out
    assert "grouped" in out and "loop/impl" in out and f"wrote {path}" in out


def test_refuses_to_time_impls_that_disagree(monkeypatch):
    grouped = RoutedExperts._grouped
    monkeypatch.setattr(RoutedExperts, "_grouped", staticmethod(lambda *a: grouped(*a) * 1.001))
    with pytest.raises(AssertionError, match="grouped and loop differ"):
        moe_step.main(ARGS)


def test_bad_tokens():
    with pytest.raises(SystemExit):
        moe_step.main(["--widths", "tiny,small", "--tokens", "1,2,3"])
