"""End-to-end runs of the Hydra app on the tiny model: every variant learns, resume is bitwise,
a checkpoint write killed halfway leaves the previous one usable, bad configs stop with one line,
non-finite updates are skipped and stop the run, W&B offline, the comparison plot.

The app runs in-process through ``mhc_train.train.app.main`` (a few seconds per run); the two
checks that need a real process (SIGKILL, stderr without traceback) use a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mhc_train.data import ensure_bundled_dataset
from mhc_train.train.app import main
from mhc_train.train.checkpoint import is_complete
from mhc_train.analysis.runs import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "train.seq_len=32", "train.batch_size=4", "optim.warmup_steps=2", "train.eval_every=0",
        "train.gains_every=0", "train.eval_batches=2", "train.threads=1", "logging.progress=false",
        "logging.plots=false"]


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """One bundled dataset (vocab 512, the tiny model's) for the whole session."""
    root = tmp_path_factory.mktemp("mhc-cache")
    old = os.environ.get("MHC_TRAIN_CACHE")
    os.environ["MHC_TRAIN_CACHE"] = str(root)
    ensure_bundled_dataset(vocab_size=512)
    yield root
    if old is None:
        os.environ.pop("MHC_TRAIN_CACHE", None)
    else:
        os.environ["MHC_TRAIN_CACHE"] = old


@pytest.fixture(autouse=True)
def restore_logging():
    """Hydra configures the root logger for each in-process run; give later tests theirs back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def run(out: Path, *overrides: str) -> int:
    flags = [o for o in overrides if o.startswith("-")]  # Hydra's parser wants them first
    try:
        main([*flags, *TINY, f"output_root={out}", *(o for o in overrides if not o.startswith("-"))])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def run_dir(out: Path, experiment: str = "default", name: str = "") -> Path:
    """The one run directory below ``out/experiment`` whose name starts with ``name+``."""
    dirs = [p.parent for p in (out / experiment).glob(f"{name + '+' if name else ''}*/metrics.jsonl")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def train_records(path: Path) -> list[dict]:
    return [r for r in read_metrics(path) if r["kind"] == "train"]


# ------------------------------------------------------------------ every variant, sweep, plot


def test_multirun_every_variant_learns_and_plot(cache, tmp_path):
    out = tmp_path / "runs"
    code = run(out, "-m", "residual=baseline,hc,mhc", "train.steps=30", "train.eval_every=15", "train.gains_every=30",
               "train.checkpoint_every=15", "experiment=quickstart", "logging.plots=true")
    assert code == 0
    sweep = out / "quickstart"
    runs = {p.name.split("+")[0]: p for p in sweep.iterdir() if (p / "metrics.jsonl").is_file()}
    assert set(runs) == {"tiny-baseline-n1", "tiny-hc-n4", "tiny-mhc-n4"}
    assert all(p.name.endswith("+train.steps:30") for p in runs.values())
    for name, d in runs.items():
        records = read_metrics(d)
        kinds = {r["kind"] for r in records}
        assert {"run", "train", "val", "gains", "checkpoint", "end"} <= kinds, name
        losses = [r["loss"] for r in records if r["kind"] == "train"]
        assert len(losses) == 30
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.4, (name, losses)
        train = [r for r in records if r["kind"] == "train"]
        assert all(r["load_imbalance"] >= 1 and r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train)
        assert train[-1]["tokens"] == 30 * 4 * 32
        gains = [r for r in records if r["kind"] == "gains"][-1]
        assert len(gains["composite_forward"]) == 6 and len(gains["h_res"]) == 6
        assert [r["step"] for r in records if r["kind"] == "val"] == [15, 30]
        assert records[-1]["kind"] == "end" and records[-1]["status"] == "complete"
        ckpts = sorted(p.name for p in (d / "checkpoints").iterdir())
        assert ckpts == ["step_0000015", "step_0000030"] and all(is_complete(d / "checkpoints" / c) for c in ckpts)
        assert (d / "figures" / "loss.png").stat().st_size > 10_000
        has_maps = (d / "figures" / "h_res_step_0000030.png").is_file()
        assert has_maps == (not name.startswith("tiny-baseline"))
        meta = json.loads((d / "checkpoints" / "step_0000030" / "meta.json").read_text())
        assert meta["config"]["residual"]["variant"] in name and meta["step"] == 30

    from mhc_train.analysis.cli import losses_main as plot_main

    plot_main([str(sweep)])
    assert (sweep / "loss_comparison.png").stat().st_size > 20_000
    # a single run again with the same overrides lands in the sweep's directory: already complete
    assert run(out, "residual=hc", "train.steps=30", "experiment=quickstart") == 0
    assert len(train_records(runs["tiny-hc-n4"])) == 30


# ------------------------------------------------------------------------------- resume


def test_resume_is_bitwise_equal_to_a_straight_run(cache, tmp_path):
    out = tmp_path / "runs"
    common = ["train.steps=12", "train.eval_every=6", "train.gains_every=6", "train.checkpoint_every=0",
              "train.grad_accum=2"]
    assert run(out, *common, "run_name=straight") == 0
    assert run(out, *common, "run_name=resumed", "train.stop_at=5") == 0
    resumed_dir = run_dir(out, name="resumed")
    assert [r["step"] for r in train_records(resumed_dir)] == [1, 2, 3, 4, 5]
    assert is_complete(resumed_dir / "checkpoints" / "step_0000005")
    assert run(out, *common, "run_name=resumed") == 0  # the same command continues (resume=auto)

    straight = read_metrics(run_dir(out, name="straight"))
    resumed = read_metrics(resumed_dir)
    for kind, keys in (("train", ("loss", "ce_loss", "grad_norm", "lr", "tokens")), ("val", ("val_loss",)),
                       ("gains", ("composite_forward", "h_res"))):
        a = [[r["step"], *(r[k] for k in keys)] for r in straight if r["kind"] == kind]
        b = [[r["step"], *(r[k] for k in keys)] for r in resumed if r["kind"] == kind]
        assert a == b and a, kind  # exact float equality
    runs = [r for r in resumed if r["kind"] == "run"]
    assert runs[-1]["resumed_from"].endswith("step_0000005")


def test_incompatible_checkpoint_is_refused(cache, tmp_path, capsys):
    out = tmp_path / "runs"
    assert run(out, "train.steps=3", "run_name=first") == 0
    first = run_dir(out, name="first")
    capsys.readouterr()
    assert run(out, "train.steps=3", "residual.n=2", "model.dim=32", f"resume={first}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("checkpoint error: ")
    assert "model.dim 64 (checkpoint) vs 32 (this run)" in err[0] and "residual.streams 4 (checkpoint) vs 2" in err[0]


def test_resume_with_changed_settings_uses_the_new_ones(cache, tmp_path):
    out = tmp_path / "runs"
    assert run(out, "train.steps=6", "run_name=a", "train.stop_at=2") == 0
    first = run_dir(out, name="a")
    assert run(out, "train.steps=6", "run_name=b", "optim.lr=0.001", "optim.weight_decay=0.0", f"resume={first}") == 0
    second = run_dir(out, name="b")
    records = train_records(second)
    assert [r["step"] for r in records] == [3, 4, 5, 6]
    assert records[0]["lr"] == 0.001  # not the checkpoint's 3e-3
    assert "optim.lr: None -> 0.001" in (second / "mhc-train.log").read_text()


KILL_DURING_SAVE = r"""
import os, signal, sys
import torch.distributed.checkpoint as dcp
real_save = dcp.save
def save(state, checkpoint_id):
    real_save(state, checkpoint_id=checkpoint_id)  # the tensors are on disk, state/meta are not
    if str(checkpoint_id).endswith("step_0000004.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
dcp.save = save
from mhc_train.train.app import main
main(sys.argv[1:])
"""


def test_killed_checkpoint_write_keeps_the_previous_one(cache, tmp_path):
    out = tmp_path / "runs"
    args = [*TINY, f"output_root={out}", "train.steps=6", "train.checkpoint_every=2"]
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *args], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "MHC_TRAIN_CACHE": str(cache)}, timeout=120)
    assert proc.returncode == -9, proc.stderr
    d = run_dir(out)
    ckpt = d / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_0000002", "step_0000004.tmp"]
    assert is_complete(ckpt / "step_0000002") and not is_complete(ckpt / "step_0000004.tmp")
    killed = {r["step"]: r["loss"] for r in train_records(d)}
    assert sorted(killed) == [1, 2, 3, 4]

    assert run(out, "train.steps=6", "train.checkpoint_every=2") == 0  # resume=auto
    records = read_metrics(d)
    assert [r for r in records if r["kind"] == "run"][-1]["resumed_from"].endswith("step_0000002")
    again = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    assert sorted(again) == [1, 2, 3, 4, 5, 6]
    assert again[3] == killed[3] and again[4] == killed[4]  # the same updates, bit for bit
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_0000004", "step_0000006"]  # .tmp gone, last 2 kept


# ---------------------------------------------------------------------------- bad configs


@pytest.fixture(scope="module")
def prepared_512(cache) -> Path:
    return ensure_bundled_dataset(vocab_size=512)


@pytest.mark.parametrize("overrides, message", [
    (["model.dimm=3"], "config error: model.dimm: unknown key"),
    (["foo=1"], "config error: foo: unknown key"),
    (["train.steps=abc"], "config error: train.steps: Value 'abc' of type 'str' could not be converted to Integer"),
    (["residual.n=0"], "config error: residual.n: expansion rate must be an integer >= 1, got 0"),
    (["residual.t_max=0"], "config error: residual.t_max: Sinkhorn iterations must be an integer >= 1, got 0"),
    (["model.n_activated_experts=9"], "config error: model.n_activated_experts: top-k 9 exceeds the 8 routed experts"),
    (["data=prepared", "data.path=/no/such/dir"], "config error: data.path: /no/such/dir: prepared dataset directory does not exist"),
    (["data=prepared", "data.path=PREPARED", "model.vocab_size=300"],
     "config error: model.vocab_size: tokenizer vocab_size 512 does not match the model's vocab_size 300"),
    (["residual=nope"], "config error: residual: unknown option 'nope'"),
    (["-m", "residual=baseline,hc", "residual.n=2,0"], "config error: residual.n: expansion rate must be an integer >= 1, got 0"),
])
def test_bad_config_stops_with_one_line(cache, prepared_512, tmp_path, capsys, overrides, message):
    overrides = [o.replace("PREPARED", str(prepared_512)) for o in overrides]
    assert run(tmp_path / "runs", *overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "runs").exists()  # stopped before any work


def test_bad_config_from_a_real_process(cache, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mhc_train.train", "residual.n=0", f"output_root={tmp_path}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "config error: residual.n: expansion rate must be an integer >= 1, got 0"
    assert "Traceback" not in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ non-finite


def test_nonfinite_update_is_skipped(cache, tmp_path):
    out = tmp_path / "runs"
    assert run(out, "train.steps=6", "train.inject_nonfinite_at=[3]") == 0
    records = train_records(run_dir(out))
    assert [r["skipped"] for r in records] == [False, False, True, False, False, False]
    assert records[2]["skip_reason"] == "non-finite loss" and records[-1]["skips_total"] == 1
    assert all(isinstance(r["loss"], float) for i, r in enumerate(records) if i != 2)


def test_consecutive_nonfinite_updates_stop_the_run(cache, tmp_path, capsys):
    out = tmp_path / "runs"
    code = run(out, "train.steps=10", "train.checkpoint_every=2", "train.max_consecutive_skips=3",
               "train.inject_nonfinite_at=[5,6,7]")
    assert code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("training stopped: 3 consecutive non-finite updates (steps 5-7")
    d = run_dir(out)
    assert err[0].endswith(str(d / "checkpoints" / "step_0000006"))
    assert is_complete(d / "checkpoints" / "step_0000006")
    records = read_metrics(d)
    assert records[-1]["kind"] == "end" and records[-1]["status"] == "stopped" and records[-1]["step"] == 7
    # the checkpoint written inside the streak holds the last good parameters: resuming continues
    assert run(out, "train.steps=10", "train.checkpoint_every=2", "train.max_consecutive_skips=3") == 0
    assert train_records(d)[-1]["step"] == 10


# ------------------------------------------------------------------------------------- W&B


def test_wandb_offline_run_directory(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-root"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "runs"
    assert run(out, "train.steps=3", "logging.wandb.enabled=true", "logging.wandb.tags=[test]",
               "train.gains_every=3", "logging.plots=true") == 0
    offline = list((tmp_path / "wandb-root" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].rglob("*.wandb"))
    # metrics.jsonl travels with the W&B run (mhc-plot reads per-layer gains from it)
    synced = offline[0] / "files" / "metrics.jsonl"
    local = next(out.rglob("metrics.jsonl"))
    assert synced.is_file() and synced.read_text() == local.read_text() and '"kind": "gains"' in local.read_text()
    assert not synced.is_symlink()  # a real copy: the W&B run stands alone
    # Per-layer gains and H_res maps are W&B data (tables), not only images.
    tables = {p.name.split("_", 1)[0] for p in offline[0].rglob("*.table.json")}
    assert any("per" in p.name for p in offline[0].rglob("*.table.json")) and any(
        "h_res" in p.name for p in offline[0].rglob("*.table.json")), tables
    # mhc-plot draws from the offline W&B directory after the run directory is gone.
    shutil.rmtree(out)
    moved = tmp_path / "elsewhere"
    shutil.move(str(offline[0]), moved)
    from mhc_train.analysis.cli import run as plot

    assert plot([str(moved / "files"), "--figures", "gains,h_res", "-o", str(tmp_path / "figs")]) == 0
    assert {p.suffix for p in (tmp_path / "figs").iterdir()} == {".png"}


# --------------------------------------------------------------------------------- signals


def test_sigterm_checkpoints_and_the_same_command_continues(cache, tmp_path, capsys, monkeypatch):
    import signal

    from mhc_train.train.trainer import Trainer

    real_step = Trainer._train_step

    def step_then_sigterm(self):
        record = real_step(self)
        if self.step == 3 and not getattr(self, "_signalled", False):
            self._signalled = True
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would; the handler only sets a flag
        return record

    monkeypatch.setattr(Trainer, "_train_step", step_then_sigterm)
    out = tmp_path / "runs"
    assert run(out, "train.steps=6") == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted: SIGTERM at step 3; checkpoint saved in ")
    d = run_dir(out)
    assert is_complete(d / "checkpoints" / "step_0000003")
    assert read_metrics(d)[-1]["status"] == "interrupted"
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    assert run(out, "train.steps=6") == 0
    assert [r["step"] for r in train_records(d)] == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------------- bf16


def test_bf16_autocast_trains_every_variant(cache, tmp_path):
    """train.precision=bf16 (the default on a GPU) on CPU autocast: MoE experts return bf16 into
    fp32 streams; every variant trains, validates and takes gains with finite numbers."""
    import json

    out = tmp_path / "runs"
    for variant in ("baseline", "hc", "mhc"):
        assert run(out, f"residual={variant}", "train.precision=bf16", "train.steps=3", "train.eval_every=3",
                   "train.gains_every=3", f"run_name={variant}") == 0
        rows = [json.loads(line) for line in (run_dir(out, name=variant) / "metrics.jsonl").read_text().splitlines()]
        run_row = next(r for r in rows if r["kind"] == "run")
        assert run_row["precision"] == "bf16"
        losses = [r["loss"] for r in rows if r["kind"] == "train"] + [r["val_loss"] for r in rows if r["kind"] == "val"]
        assert len(losses) == 4 and all(isinstance(v, float) and 0 < v < 10 for v in losses), losses
