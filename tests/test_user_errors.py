"""User errors end in one line and exit 2, and a run that never began leaves no run directory.

The cases a careful user met with a traceback, a silent acceptance or a stray directory: a group
override without a key (``=5``), a list for a config group (``model=[tiny,small]``), ``--cfg``
with an invalid value, a CUDA device on a machine without one, a bundled vocabulary too small for
the tokenizer, a truncated shard, a corpus too small for one batch, a mismatched checkpoint
(refused before the dataset is built), Ctrl-C while starting; and the defaults that make the
documented short runs work (the warmup and sequence length fit the run and the model).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_train import run, run_dir, train_records  # noqa: F401

from mhc_train.data import ensure_bundled_dataset


@pytest.fixture(scope="module")
def cache(subprocess_env):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MHC_TRAIN_CACHE", subprocess_env["MHC_TRAIN_CACHE"])
        yield Path(subprocess_env["MHC_TRAIN_CACHE"])


@pytest.fixture(scope="module")
def damaged_data(cache, tmp_path_factory) -> dict[str, Path]:
    """Copies of the bundled tiny-vocabulary dataset: one with a truncated train shard."""
    source = ensure_bundled_dataset(vocab_size=512)
    root = tmp_path_factory.mktemp("data")
    truncated = root / "truncated"
    shutil.copytree(source, truncated)
    shard = truncated / "train_00000.bin"
    with open(shard, "r+b") as f:
        f.truncate(1001)
    return {"truncated": truncated, "intact": Path(source)}


CASES = [
    (["=5"], "config error: override '=5': "),
    (["model=[tiny,small]"], "config error: model: a list (model=[tiny,small]) would merge several model configs"),
    (["-m", "model=[tiny,small]"], "config error: model: a list"),
    (["--cfg=job", "residual.n=0"], "config error: residual.n: expansion rate must be an integer >= 1, got 0"),
    (["data.vocab_size=10"], "config error: data.vocab_size: the bundled tokenizer needs an integer >= 260"),
    (["data=prepared", "data.path=TRUNCATED"], "data error: TRUNCATED/train_00000.bin: 1001 bytes, but meta.json says"),
    (["data=prepared", "data.path=INTACT", "train.batch_size=100000"],
     "data error: INTACT [train]: 2585593 tokens make"),
]
if not torch.cuda.is_available():
    CASES.append((["train.device=cuda"], "config error: train.device: cuda requested, but CUDA is not available"))


@pytest.mark.parametrize("overrides, message", CASES, ids=[" ".join(o) for o, _ in CASES])
def test_one_line_exit_2_and_no_directory(damaged_data, tmp_path, capsys, overrides, message):
    def fill(text: str) -> str:
        return text.replace("TRUNCATED", str(damaged_data["truncated"])).replace("INTACT", str(damaged_data["intact"]))

    assert run(tmp_path / "runs", *map(fill, overrides)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(fill(message)), err
    assert not (tmp_path / "runs").exists()


def test_errors_found_inside_the_job_leave_no_directory(cache, tmp_path, capsys, monkeypatch):
    """A mismatched checkpoint is refused before the dataset is built, and the new run directory
    (only what the launch wrote) is removed; the checkpoint's own run directory is untouched."""
    from mhc_train.train import trainer

    out = tmp_path / "runs"
    assert run(out, "train.steps=2", "run_name=first") == 0
    first = run_dir(out, name="first")
    before = sorted(p.relative_to(first) for p in first.rglob("*"))

    def no_data(cfg):
        raise AssertionError("the dataset was built before the checkpoint was checked")

    monkeypatch.setattr(trainer, "data_path", no_data)
    capsys.readouterr()
    assert run(out, "train.steps=2", "model.dim=32", "run_name=second", f"resume={first}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("checkpoint error: ") and "does not fit this run" in err[0], err
    assert [p.name for p in (out / "default").iterdir()] == [first.name]
    assert sorted(p.relative_to(first) for p in first.rglob("*")) == before


def test_ctrl_c_while_starting_is_one_line(cache, tmp_path, capsys, monkeypatch):
    from mhc_train.train import app
    from mhc_train.train.trainer import Trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # during the pre-validation (imports, composing)
        m.setattr(app, "validate", interrupted)
        assert run(tmp_path / "a", "train.steps=2") == 130
    assert capsys.readouterr().err.strip() == "interrupted: stopped while starting (nothing was written)"
    with monkeypatch.context() as m:  # in the job, before the trainer handles signals
        m.setattr(Trainer, "fit", interrupted)
        assert run(tmp_path / "b", "train.steps=2") == 130
    assert capsys.readouterr().err.strip() == \
        "interrupted: stopped while starting; no checkpoint was saved or resumed from by this run"


def test_short_documented_runs_work_with_the_defaults(cache, tmp_path):
    """train.steps=3 with the default warmup (30 steps, cut to end by the first decay) and the
    default sequence length (256, cut to the tiny model's 128): no override needed."""
    from hydra import compose, initialize_config_dir

    from mhc_train.train.config import CONFIG_DIR, register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        short = validate(compose("config", overrides=["model=tiny", "train.steps=3"]))
        usual = validate(compose("config", overrides=["model=small", "train.steps=200"]))
        constant = validate(compose("config", overrides=["train.steps=10", "optim.schedule=constant"]))
        chosen = validate(compose("config", overrides=["train.steps=3", "optim.warmup_steps=0", "train.seq_len=64"]))
    assert (short.optim.warmup_steps, short.train.seq_len) == (2, 128)  # first decay at round(0.8 x 3) = 2
    assert (usual.optim.warmup_steps, usual.train.seq_len) == (30, 256)  # unchanged where they fit
    assert constant.optim.warmup_steps == 10
    assert (chosen.optim.warmup_steps, chosen.train.seq_len) == (0, 64)  # an explicit value wins
    out = tmp_path / "runs"
    assert run(out, "train.steps=3", "train.seq_len=null", "optim.warmup_steps=null") != 0  # not a value
    assert run(out, "model=tiny", "train.steps=3", "train.batch_size=2", "train.eval_batches=1") == 0
    assert len(train_records(run_dir(out))) == 3


@pytest.mark.parametrize("overrides, message", [
    (["train.compile=true", "residual.recompute=auto"], "config error: train.compile: not with residual.recompute alone"),
    (["train.compile=true", "residual.recompute=2"], "config error: train.compile: not with residual.recompute alone"),
    (["train.activation_checkpoint=some"], "config error: train.activation_checkpoint: must be one of none, selective, full"),
])
def test_compile_and_checkpoint_options_are_checked(cache, tmp_path, capsys, overrides, message):
    assert run(tmp_path / "runs", *overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("setting", ["off", "none", "0"])
def test_compile_accepts_every_spelling_of_recompute_off(composer, setting):
    """train.compile refuses residual.recompute alone by what the setting means, not its spelling."""
    from mhc_train.train.config import validate

    cfg = validate(composer("model=tiny", "train.compile=true", f"residual.recompute={setting}"))
    assert cfg.train.compile


def test_matmul_precision_is_checked_and_applied_on_cuda_only(composer):
    """train.matmul_precision: TF32 for the fp32 matmuls (the mHC projection) on CUDA; a CPU run's
    numerics never change with it."""
    from mhc_train.train.config import ConfigError, validate
    from mhc_train.train.trainer import apply_matmul_precision

    with pytest.raises(ConfigError, match="train.matmul_precision: must be high"):
        validate(composer("model=tiny", "train.matmul_precision=medium"))
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        apply_matmul_precision("high", torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"
        apply_matmul_precision("high", torch.device("cuda"))  # a device object needs no GPU
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(saved)
