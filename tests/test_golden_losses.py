"""Today's code reproduces the committed golden losses (tests/golden/losses.json) within 1e-5:
the tiny model's first 20 steps for baseline, HC, mHC, and mHC through a 2-stage pipeline (fp32,
deterministic CPU). A change meant to move them regenerates the file on purpose:
``python -m mhc_train.train.golden --write``."""

from __future__ import annotations

from pathlib import Path

import pytest

from mhc_train.train import golden


def test_the_golden_file_covers_every_reference_run():
    losses = golden.read_golden()
    assert set(losses) == set(golden.RUNS) and all(len(v) == golden.STEPS for v in losses.values())
    assert losses["baseline"] != losses["mhc"] != losses["hc"]  # three different curves


def test_compare_names_the_first_step_that_moved():
    want = [6.25, 6.23, 6.20]
    assert golden.compare(want, [6.25, 6.23 + 5e-6, 6.20]) is None
    assert golden.compare(want, [6.25, 6.23 + 2e-5, 6.21]).startswith("step 2: loss 6.2300200")
    assert golden.compare(want, want[:2]) == "2 steps, 3 in the golden file"


def test_todays_code_reproduces_the_golden_losses(subprocess_env, tmp_path, monkeypatch):
    for key, value in subprocess_env.items():  # the session's bundled-corpus cache
        monkeypatch.setenv(key, value)
    expected = golden.read_golden()
    got = golden.train_losses(list(golden.RUNS), Path(tmp_path))
    problems = {name: golden.compare(expected[name], got[name]) for name in golden.RUNS}
    assert not any(problems.values()), {k: v for k, v in problems.items() if v} | {
        "regenerate on purpose": "python -m mhc_train.train.golden --write"}
