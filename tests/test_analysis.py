"""mhc-plot and the reproduction sweeps: figures from synthetic run logs, sweep expansion,
composite gains through the analysis path, and the one-line errors (exit code 2)."""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from mhc_train.analysis import cli, runs as R
from mhc_train.analysis.runs import AnalysisError

MODEL = {"name": "tiny", "vocab_size": 512, "dim": 64, "n_layers": 2, "n_dense_layers": 1, "n_heads": 4,
         "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "kv_lora_rank": 32, "q_lora_rank": 0,
         "max_seq_len": 128, "n_routed_experts": 8, "n_activated_experts": 2, "n_shared_experts": 1,
         "moe_ffn_dim": 32, "init_std": 0.02, "norm_eps": 1e-6}


def hc_like(layers: int, n: int, rng) -> np.ndarray:
    """Unconstrained maps whose products grow: identity plus positive noise."""
    return np.eye(n)[None] + 0.3 + 0.1 * rng.random((layers, n, n))


def doubly_stochastic(layers: int, n: int) -> np.ndarray:
    return np.stack([0.9 * np.eye(n) + 0.1 / n * np.ones((n, n))] * layers)


def write_run(root: Path, name: str, *, variant: str, n: int = 4, t_max: int = 20, fix=(), dim: int = 64,
              seq_len: int = 128, steps: int = 60, offset: float = 0.0, experiment: str = "exp",
              gains: bool = True, run_record: bool = True, model_name: str = "tiny", gain_steps=(),
              spike: dict | None = None) -> Path:
    """A fake run directory: run record, train / val / gains / end records. ``gain_steps``:
    more steps with gains records (HC's growing with the step); ``spike``: {step: added loss}."""
    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    model = dict(MODEL, dim=dim, name=model_name)
    config = {
        "model": model,
        "residual": {"variant": variant, "n": n, "t_max": t_max, "fix_res": "res" in fix, "fix_pre": "pre" in fix,
                     "fix_post": "post" in fix},
        "train": {"steps": steps, "seq_len": seq_len, "batch_size": 8, "grad_accum": 1, "seed": 0},
        "data": {"source": "bundled", "path": None, "vocab_size": 512, "train_split": "train"},
        "experiment": {"name": experiment},
    }
    streams = 1 if variant == "baseline" else n
    recs = []
    if run_record:
        recs.append({"kind": "run", "step": 0, "run_name": name, "experiment": experiment, "variant": variant,
                     "n": streams, "t_max": t_max, "model": "tiny", "params": 1000 * dim * dim,
                     "flops_per_token": 6.0 * 1000 * dim * dim, "config": config})
    tokens_per_step = 8 * seq_len
    for s in range(1, steps + 1):
        loss = 6.0 * math.exp(-s / 30) + 3.0 + offset - 0.002 * (dim / 32) + 0.003 * rng.standard_normal()
        loss += (spike or {}).get(s, 0.0)
        recs.append({"kind": "train", "step": s, "loss": loss, "grad_norm": 1.0 + 0.1 * rng.random(),
                     "lr": 1e-3, "tokens": s * tokens_per_step, "step_time_s": 0.01 * (1.5 if streams > 1 else 1.0),
                     "skipped": False})
        if s % 20 == 0:
            recs.append({"kind": "val", "step": s, "val_loss": loss + 0.05})
    for s in sorted({*gain_steps, steps}) if gains and streams > 1 else ():
        h = hc_like(4, n, rng) * (s / steps) ** 0.5 if variant == "hc" else doubly_stochastic(4, n)
        recs.append({"kind": "gains", "step": s, **R.gains_from_h_res(h.tolist()), "h_res": h.tolist()})
    recs.append({"kind": "end", "step": steps, "status": "complete"})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    main = root / "main"
    write_run(main, "tiny-baseline-n1", variant="baseline")
    write_run(main, "tiny-hc-n4", variant="hc", offset=-0.03, gain_steps=(20, 40))
    write_run(main, "tiny-mhc-n4", variant="mhc", offset=-0.02, gain_steps=(20, 40))
    write_run(main, "tiny-mhc-n2", variant="mhc", n=2, offset=-0.01)
    write_run(main, "tiny-mhc-n4-t1", variant="mhc", t_max=1, offset=-0.015)
    write_run(main, "tiny-hc-fixpost", variant="hc", fix=("post",), offset=-0.025)
    write_run(main, "tiny-baseline-d32", variant="baseline", dim=32)
    write_run(main, "tiny-mhc-d32", variant="mhc", dim=32, offset=-0.01)
    return root


def _run_cli(args, capsys):
    code = cli.run([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------ figures


def test_every_figure_from_synthetic_runs(runs_root, tmp_path, capsys):
    out = tmp_path / "figs"
    code, stdout, err = _run_cli([runs_root / "main", "-o", out, "--figures", "all", "--prefix", "t_"], capsys)
    assert code == 0, err
    for name in ("loss_gap", "grad_norm", "gains", "gains_by_step", "h_res", "scaling", "sweep_n", "sweep_t_max",
                 "ablation"):
        png = out / f"t_{name}.png"
        assert png.is_file() and png.stat().st_size > 5000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((out / "t_summary.json").read_text())
    hc = next(r for r in rows if r["run"] == "tiny-hc-n4")
    assert hc["baseline"] == "tiny-baseline-n1" and hc["gap"] == pytest.approx(-0.03, abs=0.01)
    assert hc["composite_forward_max"] > 2.0
    mhc = next(r for r in rows if r["run"] == "tiny-mhc-n4")
    assert mhc["composite_forward_max"] == pytest.approx(1.0)
    d32 = next(r for r in rows if r["run"] == "tiny-mhc-d32")
    assert d32["baseline"] == "tiny-baseline-d32"  # paired by model, not by name
    assert "| HC (n=4) |" in (out / "t_summary.md").read_text()


def test_auto_mode_skips_what_the_runs_cannot_show(runs_root, tmp_path, capsys):
    out = tmp_path / "figs"
    code, _, err = _run_cli([runs_root / "main" / "tiny-baseline-n1", runs_root / "main" / "tiny-hc-n4", "-o", out,
                             "--pdf"], capsys)
    assert code == 0, err
    assert (out / "loss_gap.png").is_file() and (out / "gains.png").is_file()
    assert (out / "loss_gap.pdf").read_bytes()[:5] == b"%PDF-"
    assert not (out / "scaling.png").exists() and "skipped scaling" in err


def test_list(runs_root, capsys):
    code, stdout, _ = _run_cli([runs_root / "main", "--list"], capsys)
    assert code == 0 and len(stdout.strip().splitlines()) == 8 and "complete" in stdout


# ----------------------------------------------------------------------------- honest figures


@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib figures the analysis saves, by file stem, to look at their artists."""
    from mhc_train.analysis import draw

    figures, save = {}, draw.save

    def keep(fig, out, pdf):
        figures[Path(out).stem] = fig
        return save(fig, out, pdf)

    monkeypatch.setattr(draw, "save", keep)
    return figures


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("mhc-plot: warning:")]


def _points(ax, label_start: str) -> list[float]:
    """The y values of the errorbar series whose label starts with ``label_start``."""
    (container,) = [c for c in ax.containers if c.get_label().startswith(label_start)]
    return list(container.lines[0].get_ydata())


def test_runs_of_other_settings_are_set_aside_not_averaged(tmp_path, capsys, drawn, monkeypatch):
    """A tiny run and a 30-step run among small 60-step runs (a sweep over n with its baseline):
    one warning line each, naming it and the setting that differs; neither is averaged into the
    sweep nor measured against the small baseline. --allow-mixed averages them, with a warning."""
    mixed = tmp_path / "quickstart"
    for name, n in (("small-baseline", 1), ("small-mhc-n2", 2), ("small-mhc-n4", 4)):
        write_run(mixed, name, variant="baseline" if n == 1 else "mhc", n=n, model_name="small", dim=128,
                  offset=-0.01 * n)
    tiny = write_run(mixed, "tiny-mhc-n4", variant="mhc", offset=0.5)
    short = write_run(mixed, "small-mhc-n4-30steps", variant="mhc", model_name="small", dim=128, steps=30)
    out = tmp_path / "figs"
    code, _, err = _run_cli([mixed, "-o", out, "--figures", "loss_gap,sweep,summary"], capsys)
    assert code == 0, err
    warnings = _warnings(err)
    assert len(warnings) == 2, err
    (w_tiny,) = [w for w in warnings if str(tiny) in w]
    (w_short,) = [w for w in warnings if str(short) in w]
    assert "set aside" in w_tiny and "loss_gap" in w_tiny and "sweep_n" in w_tiny
    assert "model.name: tiny vs small" in w_tiny
    assert "train.steps: 30 vs 60" in w_short
    # the n = 4 point of the sweep is the small 60-step run alone, the baseline line the small baseline
    small = {p.name: R.load_run_dir(p) for p in mixed.iterdir() if p.name.startswith("small-")}
    ax = drawn["sweep_n"].axes[0]
    assert _points(ax, "mHC: training loss") == pytest.approx([small["small-mhc-n2"].final_loss(0.1),
                                                               small["small-mhc-n4"].final_loss(0.1)])
    assert [ln.get_ydata()[0] for ln in ax.lines if ln.get_label() == "baseline: training loss"] == \
        pytest.approx([small["small-baseline"].final_loss(0.1)])
    assert len(drawn["loss_gap"].axes[0].get_lines()) == 1 + 2 + 2  # 2 gaps, their val dots, the zero line
    rows = {r["run"]: r for r in json.loads((out / "summary.json").read_text())}
    assert rows["tiny-mhc-n4"].get("gap") is None and rows["small-mhc-n4"]["baseline"] == "small-baseline"

    # mhc-plot-losses (the alias) measures each run against the baseline of its own settings only
    cli.losses_main([str(mixed), "-o", str(tmp_path / "cmp.png")])
    err = capsys.readouterr().err
    assert len(_warnings(err.replace("mhc-plot-losses:", "mhc-plot:"))) == 2 and str(tiny) in err, err
    gaps = [ln.get_label() for ln in drawn["cmp"].axes[1].get_lines() if not ln.get_label().startswith("_")]
    assert sorted(gaps) == ["baseline (reference)", "mHC (n=2, t_max=20) - baseline",
                            "mHC (n=4, t_max=20) [model=small, steps=60] - baseline"], gaps

    code, _, err = _run_cli([mixed, "-o", out, "--figures", "sweep", "--allow-mixed"], capsys)
    assert code == 0 and all("mixed across settings" in w for w in _warnings(err)), err
    n4 = _points(drawn["sweep_n"].axes[0], "mHC: training loss")[1]
    assert n4 == pytest.approx(np.mean([R.load_run_dir(p).final_loss(0.1)
                                        for p in (mixed / "small-mhc-n4", tiny, short)]))


def test_loss_gap_marks_points_beyond_its_axis(tmp_path, capsys, drawn):
    write_run(tmp_path, "base", variant="baseline")
    write_run(tmp_path, "mhc", variant="mhc", spike={4: 3.0, 40: 0.6})  # in the first 20% of steps, and later
    code, _, err = _run_cli([tmp_path, "--figures", "loss_gap", "-o", tmp_path / "f", "--ema", "0"], capsys)
    assert code == 0, err
    ax = drawn["loss_gap"].axes[0]
    lo, hi = ax.get_ylim()
    marks = [ln for ln in ax.get_lines() if ln.get_gid() == "clipped"]
    marked = {x for ln in marks for x in ln.get_xdata()}
    assert 4 in marked and all(y in (lo, hi) for ln in marks for y in ln.get_ydata())
    for ln in ax.get_lines():  # every point of a curve is inside the axis or marked on its edge
        if ln not in marks:
            xs, ys = ln.get_xdata(), ln.get_ydata()
            assert {x for x, y in zip(xs, ys) if not lo <= y <= hi} <= marked
    assert hi >= 0.6  # the later spike is inside the range, not clipped
    assert re.search(r"1 point beyond the axis, farthest \+3\.0\d* at step 4", ax.get_title()), ax.get_title()


def test_h_res_maps_use_a_diverging_colormap_centred_at_0(tmp_path, capsys, drawn, monkeypatch):
    h = np.stack([np.eye(3) + np.array([[0.0, -0.3, 0.2], [0.1, 0.0, -0.05], [0.4, 0.1, 0.0]])] * 4) * 20
    d = write_run(tmp_path, "hc", variant="hc", n=3, gains=False)
    with open(d / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "gains", "step": 60, "h_res": h.tolist()}) + "\n")
    code, _, err = _run_cli([d, "--figures", "h_res", "-o", tmp_path / "f"], capsys)
    assert code == 0, err
    from mhc_train.analysis import plot_h_res

    plot_h_res(h / 20, tmp_path / "per_layer.png", step=60)  # the trainer's per-layer figure
    kept = {"fig": drawn["per_layer"]}
    for fig in (drawn["h_res"], kept["fig"]):
        images = [im for ax in fig.axes for im in ax.get_images()]
        assert images
        for im in images:
            m = im.get_array()
            assert im.get_cmap().name == "RdBu_r" and im.norm(0.0) == pytest.approx(0.5)
            assert im.colorbar is not None or fig is kept["fig"]
            if m.min() < 0:  # the most negative entry is clearly blue, not white
                r, _, b, _ = im.get_cmap()(im.norm(m.min()))
                assert b - r > 0.3
        assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)


def test_a_figure_that_cannot_be_drawn_removes_its_stale_file(runs_root, tmp_path, capsys):
    out = tmp_path / "figs"
    out.mkdir()
    stale = ["scaling.png", "scaling.pdf", "sweep_n.png", "sweep_t_max.png", "ablation.png", "loss_gap.png"]
    for name in stale:
        (out / name).write_bytes(b"from an earlier call")
    main = runs_root / "main"
    code, _, err = _run_cli([main / "tiny-baseline-n1", main / "tiny-hc-n4", "-o", out, "--figures",
                             "loss_gap,scaling"], capsys)
    assert code == 2  # asked by name: the first that fails is an error, and its file is gone
    assert "scaling (removed the stale scaling.png, scaling.pdf)" in err and not (out / "scaling.png").exists()
    code, _, err = _run_cli([main / "tiny-baseline-n1", main / "tiny-hc-n4", "-o", out], capsys)
    assert code == 0, err
    skipped = [line for line in err.splitlines() if line.startswith("mhc-plot: skipped")]
    assert any(line.startswith("mhc-plot: skipped sweep (removed the stale sweep_n.png, sweep_t_max.png): ")
               for line in skipped), err
    assert any(line.startswith("mhc-plot: skipped ablation (removed the stale ablation.png): ") for line in skipped)
    assert {p.name for p in out.iterdir()} >= {"loss_gap.png", "gains.png"}
    assert not any((out / name).exists() for name in stale if not name.startswith("loss_gap"))
    assert (out / "loss_gap.png").read_bytes()[:4] == b"\x89PNG"


def test_gains_against_the_step_and_each_variant_on_its_own_scale(runs_root, tmp_path, capsys, drawn):
    main = runs_root / "main"
    code, _, err = _run_cli([main / "tiny-hc-n4", main / "tiny-mhc-n4", "-o", tmp_path,
                             "--figures", "gains,gains_by_step"], capsys)
    assert code == 0, err
    assert (tmp_path / "gains_by_step.png").stat().st_size > 5000
    hc, mhc = (R.load_run_dir(main / name) for name in ("tiny-hc-n4", "tiny-mhc-n4"))
    by_step = {ax.get_title(): ax for ax in drawn["gains_by_step"].axes}
    assert set(by_step) == {"HC", "mHC"}
    (forward,) = [ln for ln in by_step["HC"].get_lines() if ln.get_label().startswith("HC")]
    assert list(forward.get_xdata()) == [20, 40, 60]
    assert list(forward.get_ydata()) == pytest.approx([max(hc.gains(s)["composite_forward"]) for s in (20, 40, 60)])
    assert forward.get_ydata()[-1] > forward.get_ydata()[0]  # HC's gain grows with training
    # mHC's gains (1.0 here) get a linear axis of their own, not HC's log axis
    gains_axes = drawn["gains"].axes
    hc_axes = [ax for ax in gains_axes if ax.get_title().startswith(("(a) HC", "(b) HC"))]
    mhc_axes = [ax for ax in gains_axes if "mHC" in ax.get_title()]
    assert len(hc_axes) == len(mhc_axes) == 2
    assert hc_axes[1].get_yscale() == "log"  # composite gains of 20-40
    for ax in mhc_axes + [by_step["mHC"]]:
        lo, hi = ax.get_ylim()
        assert ax.get_yscale() == "linear" and hi - lo < 0.5 and lo <= 1.0 <= hi
    assert max(mhc.gains()["composite_backward"]) == pytest.approx(1.0)


# -------------------------------------------------------------------------------------- gains


def test_composite_gains_of_known_matrices_through_the_analysis_path(tmp_path):
    # diag(2, 1) three times: single gains 2; forward composite H_l..H_1 = diag(2^l, 1);
    # backward composite H_3..H_l = diag(2^(4-l), 1).
    h = [[[2.0, 0.0], [0.0, 1.0]]] * 3
    d = write_run(tmp_path, "r", variant="hc", n=2, gains=False)
    with open(d / "metrics.jsonl", "a") as f:  # a gains record with the matrices only
        f.write(json.dumps({"kind": "gains", "step": 60, "h_res": h}) + "\n")
    g = R.load_run_dir(d).gains()
    assert g["single_forward"] == pytest.approx([2, 2, 2])
    assert g["composite_forward"] == pytest.approx([2, 4, 8])
    assert g["composite_backward"] == pytest.approx([8, 4, 2])
    # forward = max |row sum|, backward = max |column sum|, of a non-symmetric map
    a = [[[1.0, 2.0], [0.0, -5.0]]]
    g = R.gains_from_h_res(a)
    assert g["single_forward"] == pytest.approx([5.0]) and g["single_backward"] == pytest.approx([3.0])
    # doubly stochastic maps: every gain 1, whatever the depth
    p = np.array([[0.7, 0.3], [0.3, 0.7]])
    g = R.gains_from_h_res([p.tolist()] * 30)
    assert max(g["composite_forward"] + g["composite_backward"]) == pytest.approx(1.0)


def test_composite_product_order():
    a = np.array([[1.0, 1.0], [0.0, 1.0]])
    b = np.array([[1.0, 0.0], [1.0, 1.0]])
    h = np.stack([a, b, a])
    assert np.allclose(R.composite_product(h, 1, 3), a @ b @ a)  # H_3 H_2 H_1
    assert np.allclose(R.composite_product(h, 1, 2), b @ a)      # paper: prod_{i=1}^{2} H_{3-i}
    assert np.allclose(R.composite_product(h, 2, 3), a @ b)
    with pytest.raises(AnalysisError):
        R.composite_product(h, 0, 2)


def test_resumed_run_keeps_the_later_record(tmp_path):
    d = write_run(tmp_path, "r", variant="baseline", steps=5)
    with open(d / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "step": 3, "loss": 42.0}) + "\n" + "{cut by a crash\n")
    run = R.load_run_dir(d)
    xs, ys = run.series("train", "loss")
    assert xs == [1, 2, 3, 4, 5] and ys[2] == 42.0


# --------------------------------------------------------------------------------- bad input


def test_no_runs(tmp_path, capsys):
    code, _, err = _run_cli([tmp_path], capsys)
    assert code == 2 and err.startswith("mhc-plot: error:") and "no runs found" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = _run_cli([tmp_path / "missing"], capsys)
    assert code == 2 and "no such run directory" in err


def test_no_baseline(tmp_path, capsys):
    write_run(tmp_path, "hc", variant="hc")
    write_run(tmp_path, "mhc", variant="mhc")
    code, _, err = _run_cli([tmp_path, "--figures", "loss_gap", "-o", tmp_path / "f"], capsys)
    assert code == 2 and "no baseline run" in err and len(err.strip().splitlines()) == 1


def test_incompatible_runs(tmp_path, capsys):
    write_run(tmp_path, "base", variant="baseline", seq_len=128)
    hc = write_run(tmp_path, "hc", variant="hc", seq_len=64)
    for extra in ([], ["--baseline", tmp_path / "base"]):
        code, _, err = _run_cli([tmp_path, "--figures", "loss_gap", "-o", tmp_path / "f", *extra], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"mhc-plot: error: loss_gap: none of the 1 runs has a baseline with its settings ({hc}:")
        assert "train.seq_len: 64 vs 128" in err


def test_other_bad_input(runs_root, tmp_path, capsys, monkeypatch):
    code, _, err = _run_cli([runs_root / "main", "--figures", "nope"], capsys)
    assert code == 2 and "unknown figure 'nope'" in err
    code, _, err = _run_cli([runs_root / "main", "--ema", "1.5"], capsys)
    assert code == 2 and "--ema" in err
    write_run(tmp_path, "only-base", variant="baseline")
    code, _, err = _run_cli([tmp_path / "only-base", "--figures", "gains", "-o", tmp_path / "f"], capsys)
    assert code == 2 and "no gains records" in err
    monkeypatch.setenv("WANDB_MODE", "offline")
    code, _, err = _run_cli(["wandb:me/mhc-train/sweep_n"], capsys)
    assert code == 2 and "WANDB_MODE=offline" in err and len(err.strip().splitlines()) == 1
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    code, _, err = _run_cli(["wandb:me/mhc-train"], capsys)
    assert code == 2 and "no W&B API key" in err
    (tmp_path / "norecord").mkdir()
    (tmp_path / "norecord" / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n")
    code, _, err = _run_cli([tmp_path / "norecord"], capsys)
    assert code == 2 and "no run record" in err


def test_history_rows_become_records():
    rows = [{"_step": 1, "train/loss": 5.0, "train/grad_norm": 1.0}, {"_step": 50, "val/val_loss": 4.0}]
    recs = R._records_from_history(rows)
    assert {"kind": "train", "step": 1, "loss": 5.0, "grad_norm": 1.0} in recs
    assert {"kind": "val", "step": 50, "val_loss": 4.0} in recs


# ------------------------------------------------------------------------------------ sweeps


EXPERIMENTS = ("sweep_n", "sweep_tmax", "ablation", "stability", "scaling", "instability")


@pytest.fixture(scope="module")
def expanded():
    from mhc_train.analysis.sweeps import expand

    return {e: expand([f"experiment={e}"]) for e in EXPERIMENTS}


def _overrides(job):
    return dict(o.split("=", 1) for o in job.overrides)


def test_sweep_configs_expand_to_the_right_runs(expanded):
    from mhc_train.analysis.sweeps import expand

    jobs = expanded["sweep_n"]
    assert sorted((_overrides(j)["residual"], int(_overrides(j)["residual.n"])) for j in jobs) == \
        [(v, n) for v in ("hc", "mhc") for n in (1, 2, 4, 8)]
    assert {j.run_dir.parent for j in jobs} == {Path("runs/sweep_n")}
    assert "tiny-mhc-n1+residual.n:1" in {j.run_dir.name for j in jobs}
    assert len({j.run_dir for j in jobs}) == 8

    jobs = expanded["sweep_tmax"]
    assert sorted(int(_overrides(j)["residual.t_max"]) for j in jobs) == [1, 3, 5, 10, 20]
    assert len({j.run_dir for j in jobs}) == 5

    jobs = expanded["ablation"]
    combos = {(_overrides(j)["residual.fix_pre"], _overrides(j)["residual.fix_post"]) for j in jobs}
    assert combos == {("True", "True"), ("True", "False"), ("False", "True"), ("False", "False")}
    assert all(j.run_dir.name.startswith("tiny-hc-n4+") for j in jobs)

    jobs = expanded["stability"]
    assert sorted(j.run_dir.name for j in jobs) == ["tiny-baseline-n1", "tiny-hc-n4", "tiny-mhc-n4"]

    jobs = expanded["scaling"]
    assert len(jobs) == 6 and len({j.run_dir for j in jobs}) == 6

    # the seed as a sweep axis: one directory per variant and seed, all in one group (groups.py)
    jobs = expanded["instability"]
    assert sorted(j.run_dir.name for j in jobs) == sorted(f"tiny-{v}+train.seed:{s}" for v in
                                                          ("baseline-n1", "hc-n4", "mhc-n4") for s in (0, 1, 2))

    # the command line narrows or extends a sweep: its values replace the yaml's for that key
    jobs = expand(["experiment=sweep_n", "residual.n=2,4"])
    assert sorted(j.run_dir.name for j in jobs) == ["tiny-hc-n2+residual.n:2", "tiny-hc-n4+residual.n:4",
                                                    "tiny-mhc-n2+residual.n:2", "tiny-mhc-n4+residual.n:4"]
    # without -m: the one run, where the sweeper's params do not apply (the sweep's baseline)
    (job,) = expand(["experiment=sweep_n", "residual=baseline"], multirun=False)
    assert job.run_dir == Path("runs/sweep_n/tiny-baseline-n1")
    # an experiment without sweep params: the command line's sweep alone (this crashed before)
    jobs = expand(["residual=mhc", "residual.n=1,2", "experiment=quickstart", "model=tiny"])
    assert sorted(j.run_dir.name for j in jobs) == ["tiny-mhc-n1+residual.n:1",
                                                    "tiny-mhc-n2+residual.n:2"]


def test_sweep_plan_command_exits_0(capsys):
    from mhc_train.analysis.sweeps import main

    main(["-m", "residual=mhc", "residual.n=1,2", "experiment=quickstart", "model=tiny"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "2 jobs, 0 complete (skipped when the sweep is launched again)", out


def test_every_job_of_the_sweeps_is_a_valid_config(expanded):
    """Each expanded job, and each sweep's baseline run, composes and passes the trainer's
    validation (as its prevalidation does)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mhc_train.train.config import CONFIG_DIR, validate

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="mhc-train"):
            for experiment, jobs in expanded.items():
                baseline_run = experiment.startswith(("sweep", "abl"))
                extra = [[f"experiment={experiment}", "residual=baseline"]] if baseline_run else []
                for overrides in [j.overrides for j in jobs] + extra:
                    cfg = validate(compose("config", overrides=overrides))
                    assert cfg.experiment.name == experiment
                    assert cfg.train.checkpoint_every == 0  # one final checkpoint: a re-launch skips the run
                    if "residual=baseline" in overrides:
                        assert cfg.residual.variant == "baseline"  # the command line beats the experiment's default
    finally:
        GlobalHydra.instance().clear()


def test_sweep_job_state(tmp_path):
    from mhc_train.analysis.sweeps import expand

    jobs = expand(["experiment=stability", f"output_root={tmp_path}"])
    assert {j.state() for j in jobs} == {"not started"}
    write_run(tmp_path / "stability", "tiny-hc-n4", variant="hc", steps=300, experiment="stability")
    states = {j.run_dir.name: j.state() for j in expand(["experiment=stability", f"output_root={tmp_path}"])}
    assert states["tiny-hc-n4"] == "complete" and states["tiny-mhc-n4"] == "not started"
