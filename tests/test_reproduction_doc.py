"""docs/reproduction.md against its data: the committed summaries in docs/results/ regenerate
every number of the doc; the intervals against closed forms; seed bands in the loss-gap figure;
summaries from synthetic runs (seeds paired, a diverged run kept out of the statistics). No
training here: everything is read from JSON or synthetic logs, in a few seconds."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from mhc_train.analysis import cli, results as RS, results_doc as RD, stats

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reproduction.md"
RESULTS = ROOT / "docs" / "results"


# ------------------------------------------------------------------------ the committed doc


def test_doc_is_generated_from_the_committed_results():
    text = DOC.read_text(encoding="utf-8")
    results = RS.load_results(RESULTS)
    assert set(RD.NEEDS) <= set(results), f"missing summaries: {set(RD.NEEDS) - set(results)}"
    assert set(RD.regions(text)) == set(RD.REGIONS), "every generated region appears in the doc, once each"
    assert RD.render(text, results) == text, (
        "docs/reproduction.md differs from what docs/results/*.json give: run `mhc-plot-results doc` "
        "(or reproduce.sh, which writes both)")


def test_results_prose_has_no_hand_typed_numbers():
    """Measured numbers live in the generated regions only: in the hand-kept prose of the results
    (between "## Results" and "## Files") no decimal number may appear."""
    text = DOC.read_text(encoding="utf-8")
    prose = RD.outside_regions(text[text.index("\n## Results"):text.index("\n## Files")])
    prose = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", prose)  # figure links
    # the method's own constants may be named: the averaging window and the interval's level
    methods = {f"{RS.WINDOW:.0%}", f"{stats.LEVEL:.0%}"}
    found = [m for m in re.findall(r"\d+\.\d+|\d+%", prose) if m not in methods]
    assert not found, found


def test_every_summary_records_its_commit_and_seeds():
    for name, res in RS.load_results(RESULTS).items():
        if name == "reproduce":
            assert res["commit"] and res["runs_seconds"] > 0
            continue
        assert re.fullmatch(r"[0-9a-f]{7,}", res["commit"] or ""), (name, res["commit"])
        for group in res["groups"]:
            for s in group["settings"]:
                assert s["n_seeds"] == len(s["seeds"]) == len(s["runs"])
                if "gap" in s:
                    assert s["gap"]["k"] == s["n_seeds"] and (s["gap"]["ci"] is None) == (s["n_seeds"] == 1)


# ------------------------------------------------------------------------------- intervals


def test_t_interval_against_closed_forms():
    # t_{0.975} has closed forms for 1 and 2 degrees of freedom: tan(0.475 pi); (2p-1)/sqrt(2p(1-p))
    assert stats.t_quantile(1) == pytest.approx(math.tan(0.475 * math.pi), abs=1e-3)
    assert stats.t_quantile(2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), abs=1e-3)
    assert stats.t_quantile(200) == pytest.approx(1.972, abs=2e-3)
    st = stats.interval([1.0, 2.0, 3.0])  # sd 1: half width t_2 / sqrt(3)
    assert st["mean"] == 2.0 and st["sd"] == pytest.approx(1.0)
    assert st["ci"] == pytest.approx([2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)], abs=1e-3)
    assert stats.sign(st) == 0 and stats.sign(stats.interval([1.0, 1.1, 1.2])) == 1
    assert stats.sign(stats.interval([-1.0, -1.1, -1.2])) == -1
    one = stats.interval([-0.02])
    assert one["ci"] is None and stats.sign(one) is None
    assert stats.describe(one) == "-0.020 (1 seed, no interval)"
    assert stats.describe(st) == "+2.000 [-0.484, +4.484] (95% t, 3 seeds)"


# ------------------------------------------------------------------------ synthetic runs


def _run(root: Path, name: str, *, variant: str, seed: int, offset: float, steps: int = 40,
         stop_at: int | None = None, experiment: str = "instability") -> Path:
    """A minimal run directory: run record with config, train / val / gains / end records."""
    d = root / experiment / name
    d.mkdir(parents=True)
    n = 1 if variant == "baseline" else 4
    config = {"model": {"name": "tiny", "dim": 64, "n_layers": 2}, "experiment": {"name": experiment},
              "residual": {"variant": variant, "n": n, "t_max": 20},
              "train": {"steps": steps, "seq_len": 16, "batch_size": 2, "seed": seed}, "optim": {"warmup_steps": 4}}
    recs = [{"kind": "run", "step": 0, "run_name": name, "variant": variant, "n": n, "experiment": experiment,
             "config": config}]
    last = stop_at or steps
    for s in range(1, last + 1):
        bad = stop_at is not None and s > stop_at - 3
        recs.append({"kind": "train", "step": s, "loss": 4.0 - s / 100 + offset + 0.01 * ((s * 7 + seed) % 3),
                     "grad_norm": "nan" if bad else 0.5 + (seed == 1 and variant == "hc") * 10 * (s == 30),
                     "tokens": 32 * s, "skipped": bad})
        if s % 20 == 0:
            recs.append({"kind": "val", "step": s, "val_loss": 4.1 - s / 100 + offset})
    if n > 1:
        grow = 3.0 if variant == "hc" else 1.0  # per-layer gains given: no torch import for H_res products
        recs.append({"kind": "gains", "step": 20, "single_forward": [grow] * 4, "single_backward": [grow] * 4,
                     "composite_forward": [grow ** k for k in range(1, 5)],
                     "composite_backward": [grow ** k for k in range(4, 0, -1)]})
    recs.append({"kind": "end", "step": last, "status": "stopped" if stop_at else "complete"})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


@pytest.fixture
def seeded(tmp_path) -> Path:
    for seed in (0, 1, 2):
        _run(tmp_path, f"tiny-baseline-n1+train.seed:{seed}", variant="baseline", seed=seed, offset=0.0)
        _run(tmp_path, f"tiny-hc-n4+train.seed:{seed}", variant="hc", seed=seed, offset=0.1 + 0.01 * seed)
        _run(tmp_path, f"tiny-mhc-n4+train.seed:{seed}", variant="mhc", seed=seed, offset=-0.05 - 0.01 * seed,
             stop_at=25 if seed == 2 else None)
    return tmp_path


def test_summaries_pair_seeds_and_keep_a_diverged_run_out(seeded, tmp_path):
    (path,) = RS.write_results(seeded, tmp_path / "results", commit="abc1234", only=["instability"])
    res = json.loads(path.read_text())
    assert res["commit"] == "abc1234" and res["config"]["swept"]["train.seed"] == [0, 1, 2]
    assert res["loss_avg"]["steps"] == [37, 40]
    hc, mhc = RD.setting(res, "hc"), RD.setting(res, "mhc")
    assert len(res["groups"]) == 1 and hc["paired_by_seed"] and hc["seeds"] == [0, 1, 2]
    # each seed against the baseline of its own seed: the offsets come back exactly
    assert hc["gap"]["values"] == pytest.approx([0.10, 0.11, 0.12], abs=1e-6) and hc["gap"]["k"] == 3
    assert mhc["seeds"] == [0, 1] and mhc["gap"]["values"] == pytest.approx([-0.05, -0.06], abs=1e-6)
    (stopped,) = mhc["not_complete"]
    assert stopped["seed"] == 2 and stopped["status"] == "stopped" and stopped["first_nonfinite_grad_step"] == 23
    (c,) = res["groups"][0]["contrasts"]
    assert c["seeds"] == [0, 1] and c["gap"]["values"] == pytest.approx([0.15, 0.17], abs=1e-6)
    assert hc["grad_norm_max"]["max"] == pytest.approx(10.5)
    assert hc["gains"]["composite_forward_max"]["values"] == [81.0] * 3
    text = RD.region_instability({"instability": res})
    assert "mHC (n=4, t_max=20) seed 2 (stopped after step 22, non-finite grad norm from step 23)" in text
    verdicts = dict((claim, v) for claim, _, _, v in RD.claims({"instability": res}))
    # the two finished seeds put HC above mHC, but the mHC seed that diverged is missing from the
    # interval: the survivors alone would flatter mHC, so the claim stays undecided
    assert stats.sign(c["gap"]) == 1
    assert verdicts["HC's instability shows in its loss: HC ends above mHC (Fig 2a)"].startswith(
        "cannot decide (mHC (n=4, t_max=20) seed 2 (stopped")
    assert verdicts["mHC trains as stably as the baseline (Fig 5b)"] == "contradicts"
    res["runs"] = [x for x in res["runs"] if x["status"] == "complete"]
    for s in RD.settings(res):
        s["not_complete"] = []
    verdicts = dict((claim, v) for claim, _, _, v in RD.claims({"instability": res}))
    assert verdicts["HC's instability shows in its loss: HC ends above mHC (Fig 2a)"] == "confirms"
    assert verdicts["mHC trains as stably as the baseline (Fig 5b)"] == "cannot decide (no run diverged)"


def test_doc_command_regenerates_and_checks(seeded, tmp_path, capsys):
    results = tmp_path / "results"
    assert cli.results_run(["write", str(seeded), "-o", str(results), "--commit", "abc1234"]) == 0
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- results:instability -->\nstale 0.123\n<!-- /results -->\nend\n")
    assert cli.results_run(["doc", "--results", str(results), "--doc", str(doc), "--check"]) == 1
    assert cli.results_run(["doc", "--results", str(results), "--doc", str(doc)]) == 0
    assert "stale" not in doc.read_text() and "(95% t, 3 seeds)" in doc.read_text()
    assert cli.results_run(["doc", "--results", str(results), "--doc", str(doc), "--check"]) == 0
    doc.write_text("<!-- results:nonsense -->\n<!-- /results -->\n")
    assert cli.results_run(["doc", "--results", str(results), "--doc", str(doc)]) == 2
    assert "unknown results region 'nonsense'" in capsys.readouterr().err


def test_loss_gap_draws_the_seed_mean_with_its_band(seeded, tmp_path, capsys, monkeypatch):
    from mhc_train.analysis import draw

    kept = {}

    def keep(fig, out, pdf):
        kept[Path(out).stem] = fig
        return [Path(out)]

    monkeypatch.setattr(draw, "save", keep)
    assert cli.run([str(seeded / "instability"), "-o", str(tmp_path / "f"), "--figures", "loss_gap"]) == 0
    ax = kept["loss_gap"].axes[0]
    labels = [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    hc = next(lb for lb in labels if lb.startswith("HC"))
    assert re.search(r"final gap \+0\.110 \[\+0\.0\d\d, \+0\.1\d\d\] \(95% t, 3 seeds\)", hc), hc
    (mhc,) = [lb for lb in labels if lb.startswith("mHC")]  # the diverged seed: marked, left out of the mean
    assert "(95% t, 2 seeds); seed 2 ended at step 22 (x)" in mhc, mhc
    assert len(ax.collections) == 2  # one band per setting
    # one seed: no band, and the legend says so
    one = tmp_path / "one"
    _run(one, "b", variant="baseline", seed=0, offset=0.0)
    _run(one, "m", variant="mhc", seed=0, offset=-0.05)
    assert cli.run([str(one), "-o", str(tmp_path / "g"), "--figures", "loss_gap"]) == 0
    ax = kept["loss_gap"].axes[0]
    assert not ax.collections and any(ln.get_label().endswith("final gap -0.050 (1 seed, no interval)")
                                      for ln in ax.get_lines()), [ln.get_label() for ln in ax.get_lines()]
    capsys.readouterr()


def test_one_seed_under_two_directory_names_is_refused(tmp_path):
    """`experiment=sweep_n` and `experiment=sweep_n train.seed=0` train the same run into two
    directories: averaging both would count one seed twice."""
    _run(tmp_path, "tiny-baseline-n1", variant="baseline", seed=0, offset=0.0)
    _run(tmp_path, "tiny-mhc-n4", variant="mhc", seed=0, offset=-0.05)
    _run(tmp_path, "tiny-mhc-n4+train.seed:0", variant="mhc", seed=0, offset=-0.05)
    with pytest.raises(RS.AnalysisError, match=r"seed 0 trained more than once .*tiny-mhc-n4, tiny-mhc-n4\+train"):
        RS.write_results(tmp_path, tmp_path / "results", commit="abc1234", only=["instability"])
