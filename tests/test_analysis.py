"""mhc-plot and the reproduction sweeps: figures from synthetic run logs, sweep expansion,
composite gains through the analysis path, and the one-line errors (exit code 2)."""

from __future__ import annotations

import json
import math
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
              gains: bool = True, run_record: bool = True) -> Path:
    """A fake run directory: run record, train / val / gains / end records."""
    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    model = dict(MODEL, dim=dim)
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
        recs.append({"kind": "train", "step": s, "loss": loss, "grad_norm": 1.0 + 0.1 * rng.random(),
                     "lr": 1e-3, "tokens": s * tokens_per_step, "step_time_s": 0.01 * (1.5 if streams > 1 else 1.0),
                     "skipped": False})
        if s % 20 == 0:
            recs.append({"kind": "val", "step": s, "val_loss": loss + 0.05})
    if gains and streams > 1:
        h = hc_like(4, n, rng) if variant == "hc" else doubly_stochastic(4, n)
        recs.append({"kind": "gains", "step": steps, **R.gains_from_h_res(h.tolist()), "h_res": h.tolist()})
    recs.append({"kind": "end", "step": steps, "status": "complete"})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    main = root / "main"
    write_run(main, "tiny-baseline-n1", variant="baseline")
    write_run(main, "tiny-hc-n4", variant="hc", offset=-0.03)
    write_run(main, "tiny-mhc-n4", variant="mhc", offset=-0.02)
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
    for name in ("loss_gap", "grad_norm", "gains", "h_res", "scaling", "sweep_n", "sweep_t_max", "ablation"):
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
    write_run(tmp_path, "hc", variant="hc", seq_len=64)
    code, _, err = _run_cli([tmp_path, "--figures", "loss_gap", "-o", tmp_path / "f"], capsys)
    assert code == 2 and "train.seq_len: 64 vs 128" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run_cli([tmp_path, "--figures", "loss_gap", "--baseline", tmp_path / "base",
                             "-o", tmp_path / "f"], capsys)
    assert code == 2 and "not comparable" in err


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


EXPERIMENTS = ("sweep_n", "sweep_tmax", "ablation", "stability", "scaling")


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
