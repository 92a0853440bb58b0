"""The one-command GPU check (mhc_train/bench/gpu_check.py) without a GPU: the one line and exit 0
when there is none; its CPU rehearsal (``--device cpu --tiny``) runs every section and writes both
reports; a section that raises or overruns its cap is recorded and the others still run; the
production table is coherent (budget under 8 minutes, names that exist, a training command the
trainer accepts). The figures themselves are not tested.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mhc_train.bench import gpu_check, gpu_step
from mhc_train.bench.gpu_budget import Allowance, Clock, SectionTimeout, hard_cap

ROOT = Path(__file__).resolve().parents[1]
SECTION_NAMES = [name for name, _, _ in gpu_check.SECTIONS]


def test_without_a_gpu_one_line_exit_0_and_nothing_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA GPU" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU line needs a machine without one")
def test_launch_script_without_a_gpu(tmp_path):
    env = dict(os.environ, PY=sys.executable, TRITON_INTERPRET="1")
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and "no CUDA GPU" in proc.stdout
    assert "unsetting TRITON_INTERPRET" in proc.stderr  # an interpreter flag never reaches a GPU run
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# The CPU rehearsal: every section at tiny shapes, run once for the tests below
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, subprocess_env):
    out = tmp_path_factory.mktemp("gpu-check")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MHC_TRAIN_CACHE", subprocess_env["MHC_TRAIN_CACHE"])  # the tiny model's dataset, built once
        code = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out)])
    return code, out, json.loads((out / "gpu_report.json").read_text()), (out / "gpu_report.md").read_text()


def numbers(value, path=""):
    """(path, number) of every int or float in a JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def test_rehearsal_runs_every_section_and_passes(rehearsal):
    code, _, report, _ = rehearsal
    sections = report["sections"]
    assert list(sections) == SECTION_NAMES
    assert {name: s["status"] for name, s in sections.items()} == {name: "passed" for name in SECTION_NAMES}, \
        {name: s.get("error") for name, s in sections.items()}
    assert code == 0 and report["passed"] is True
    for name, s in sections.items():
        assert s["summary"] and 0 <= s["seconds"] <= s["cap_s"], name
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["triton"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", env["date"])


def test_rehearsal_numbers_are_finite(rehearsal):
    _, _, report, _ = rehearsal
    found = list(numbers(report["sections"]))
    assert len(found) > 100
    bad = [(p, v) for p, v in found if not math.isfinite(v)]
    assert not bad, bad
    step = report["sections"]["step"]["rows"]
    assert [(r["variant"], r["backend"], r["mode"]) for r in step] == [
        ("baseline", "-", "eager"), ("hc", "-", "eager"), ("mhc", "torch", "eager"), ("mhc", "triton", "eager"),
        ("baseline", "-", "compile")]
    assert all(r["median_ms"] > 0 and r["vs_baseline"] > 0 and r["status"] == "ok" for r in step)
    kernels = report["sections"]["kernels"]
    assert {t["op"] for t in kernels["tensors"]} == {"sinkhorn_knopp", "mhc_mappings", "fused_pre_mappings",
                                                     "apply_pre", "apply_post_res"}
    assert all(t["passed"] for t in kernels["tensors"])
    bandwidth = report["sections"]["bandwidth"]["rows"]
    assert {(r["op"], r["impl"]) for r in bandwidth} == {(op, impl) for op in gpu_check.MEMORY_BOUND_OPS
                                                         for impl in ("torch", "triton")}
    train = report["sections"]["train"]
    assert train["steps"] == 2 and train["exit_code"] == 0 and train["last_loss"] < train["first_loss"]


def test_rehearsal_markdown_is_readable(rehearsal):
    _, _, report, md = rehearsal
    assert md.startswith("# GPU check: CPU (rehearsal), ")
    assert "**Result: all sections passed.**" in md
    headings = re.findall(r"^## \d\. (.+)$", md, flags=re.M)
    assert headings == [s["title"] for s in report["sections"].values()]
    for block in re.split(r"\n\n", md):  # every table: a header, a rule, rows of the header's width
        lines = block.strip().splitlines()
        if lines and lines[0].startswith("|"):
            widths = {line.count(" | ") for line in lines if not line.startswith("|---")}
            assert len(widths) == 1 and lines[1].startswith("|---"), block
    assert "None" not in md and "nan" not in md
    from mhc_train.bench.gpu_report import markdown

    report["environment"].update(device_name="NVIDIA H200", memory_GiB=139.8, multiprocessors=132,
                                 compute_capability="9.0")
    assert markdown(report).startswith("# GPU check: NVIDIA H200 (140 GiB, 132 SMs, compute capability 9.0), ")


# --------------------------------------------------------------------------------------------
# Failures are recorded, the rest still runs
# --------------------------------------------------------------------------------------------


def test_a_section_that_raises_is_recorded_and_the_others_run(tmp_path, monkeypatch, capsys):
    def broken(check):
        raise RuntimeError("kernel exploded\nsecond line")

    sections = [(n, t, broken if n == "kernels" else f) for n, t, f in gpu_check.SECTIONS]
    monkeypatch.setattr(gpu_check, "SECTIONS", sections)
    code = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--sections", "kernels,sinkhorn"])
    assert code == 1
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    kernels, sinkhorn = report["sections"]["kernels"], report["sections"]["sinkhorn"]
    assert kernels["status"] == "error" and kernels["error"] == "RuntimeError: kernel exploded"
    assert "kernel exploded" in kernels["traceback"]
    assert sinkhorn["status"] == "passed" and len(sinkhorn["rows"]) == 2
    md = (tmp_path / "gpu_report.md").read_text()
    assert "**error**: RuntimeError: kernel exploded" in md
    assert "1 of 2 sections did not pass: kernels" in md
    assert "kernels: error in" in capsys.readouterr().out  # progress lines say it as it happens


def test_a_section_past_its_cap_is_stopped_and_recorded(tmp_path):
    shapes = dataclasses.replace(gpu_check.SHAPES["tiny"], budget={"sinkhorn": (0.5, 1.0)})
    check = gpu_check.Check(torch.device("cpu"), shapes, tmp_path, Clock())
    start = time.perf_counter()
    record = gpu_check.run_section(check, "sinkhorn", "Sleeps", lambda check: time.sleep(10))
    assert time.perf_counter() - start < 5
    assert record["status"] == "error" and record["error"] == "SectionTimeout: over its cap of 1 s"


def test_a_section_is_skipped_when_the_whole_budget_is_spent(tmp_path):
    shapes = dataclasses.replace(gpu_check.SHAPES["tiny"], budget_s=0.0)
    check = gpu_check.Check(torch.device("cpu"), shapes, tmp_path, Clock())
    record = gpu_check.run_section(check, "sinkhorn", "Never runs", lambda check: pytest.fail("ran"))
    assert record["status"] == "skipped"


def test_a_compile_failure_is_recorded_for_its_configuration(tmp_path, monkeypatch):
    from mhc_train.model import MHCTransformer, load_model_config
    from mhc_train.residual import ResidualConfig

    def no_compile(model, backend):
        raise RuntimeError("inductor: no C++ compiler")

    monkeypatch.setattr(gpu_step, "compile_blocks", no_compile)
    check = gpu_check.Check(torch.device("cpu"), gpu_check.SHAPES["tiny"], tmp_path, Clock())
    model = MHCTransformer(load_model_config("tiny", n_layers=1), ResidualConfig(variant="baseline"))
    tokens = torch.zeros(1, 5, dtype=torch.long)
    config = gpu_step.StepConfig("baseline", None, "compile", model)
    gpu_step.warm_up(check, config, tokens, seconds=60)
    assert config.error == "compile and first steps did not finish: RuntimeError: inductor: no C++ compiler"
    assert config.model is None and config.warmup_s is not None
    late = gpu_step.StepConfig("baseline", None, "eager", model)
    gpu_step.warm_up(check, late, tokens, seconds=0)
    assert late.error == "warm-up steps not started: no time left in the section's cap"


def tiny_check(tmp_path, estimate_s=30.0, **changes) -> gpu_check.Check:
    shapes = dataclasses.replace(gpu_check.SHAPES["tiny"], **changes)
    check = gpu_check.Check(torch.device("cpu"), shapes, tmp_path, Clock())
    check.allowance = Allowance(check.clock, estimate_s, 60.0)
    return check


def test_a_kernel_that_fails_is_a_result_and_the_other_kernels_still_run(monkeypatch):
    import mhc_kernels
    from mhc_train.bench import gpu_kernels

    def broken(*args):
        raise RuntimeError("PTX compilation failed")

    monkeypatch.setattr(mhc_kernels, "apply_pre_forward", broken)  # what torch.ops.mhc.apply_pre runs
    records = gpu_kernels.compare_kernels(4, 4, 8, 2, torch.bfloat16, torch.device("cpu"), with_sinkhorn=False)
    failed = [r for r in records if not r["passed"]]
    assert failed == [{"op": "apply_pre", "C": 8, "tensor": "-", "rel_error": failed[0]["rel_error"],
                       "tolerance": None, "passed": False, "error": "RuntimeError: PTX compilation failed"}]
    assert {r["op"] for r in records} == {"mhc_mappings", "fused_pre_mappings", "apply_pre", "apply_post_res"}
    assert gpu_kernels._op_row(failed)["error"] == "RuntimeError: PTX compilation failed"
    want = torch.ones(3)
    assert gpu_kernels.relative_error(None, want) == 1.0  # a missing gradient counts as zeros
    assert gpu_kernels.relative_error(torch.ones(3), torch.zeros(3)) == pytest.approx(3 ** 0.5)


def test_a_failing_op_leaves_a_row_with_its_error_in_the_bandwidth_table(tmp_path, monkeypatch):
    import mhc_kernels
    from mhc_train.bench import gpu_op_speed

    def broken(x, h):
        raise RuntimeError("no")

    monkeypatch.setattr(mhc_kernels, "apply_pre_forward", broken)  # what torch.ops.mhc.apply_pre runs
    check = tiny_check(tmp_path, widths=(8,), bandwidth_ops=("apply_pre",), most_repeats=2, least_repeats=2)
    result = gpu_op_speed.run_bandwidth(check)
    torch_row, triton_row = result["rows"]
    assert torch_row["fwd_ms"] > 0 and torch_row["repeats"] == 2
    assert triton_row["impl"] == "triton" and triton_row["error"] == "RuntimeError: no" and "fwd_ms" not in triton_row
    assert result["passed"] is False


@pytest.mark.parametrize("command, error", [
    ("import sys; print('boom', file=sys.stderr); sys.exit(3)", "the trainer exited 3 after 0 steps"),
    ("import time; time.sleep(30)", "the trainer did not finish in 1 s after 0 steps"),
])
def test_a_training_run_that_fails_or_hangs_is_recorded(tmp_path, monkeypatch, command, error):
    from mhc_train.bench import gpu_train_run

    monkeypatch.setattr(gpu_train_run, "train_command", lambda check: [sys.executable, "-c", command])
    check = tiny_check(tmp_path)
    check.allowance.cap_s = 3.0  # the run gets what is left of the cap, less 2 s
    result = gpu_train_run.run_training(check)
    assert result["passed"] is False and result["error"] == error
    if "boom" in command:
        assert result["stderr_tail"] == "boom" and result["summary"][-1] == "stderr ends: boom"


def test_triton_interpreter_is_removed_for_a_gpu_and_switched_on_for_the_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="already imported interpreted"):  # this process imported them
        gpu_check.prepare_triton(torch.device("cuda"))
    monkeypatch.delitem(sys.modules, "mhc_kernels")
    assert "unset for this GPU run" in gpu_check.prepare_triton(torch.device("cuda"))
    assert "TRITON_INTERPRET" not in os.environ
    assert "Triton's interpreter" in gpu_check.prepare_triton(torch.device("cpu"))
    assert os.environ["TRITON_INTERPRET"] == "1"
    assert gpu_check.prepare_triton(torch.device("cpu")) is None


def test_unknown_sections_are_refused(tmp_path):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--sections", "kernels,warp"])
    assert e.value.code == 2 and not any(tmp_path.iterdir())


def test_report_cells_and_json_keep_non_finite_numbers_readable():
    from mhc_train.bench.gpu_report import cell, json_safe

    assert cell(float("nan"), ".2e") == "nan" and cell(None, ".1f") == "-" and cell(False, None) == "**NO**"
    assert cell("a|b\nc", None) == "a\\|b c"
    assert json.loads(json.dumps(json_safe({"x": [float("inf"), 1.5]}))) == {"x": ["inf", 1.5]}


class StubModel(torch.nn.Module):
    """Stands for the model in the timing rounds: a loss, or a failure at a given call."""

    def __init__(self, fail_at: int | None = None, exc: Exception | None = None):
        super().__init__()
        self.w, self.calls, self.fail_at, self.exc = torch.nn.Parameter(torch.ones(2)), 0, fail_at, exc

    def forward(self, inputs, targets):
        self.calls += 1
        if self.calls == self.fail_at:
            if isinstance(self.exc, float):
                time.sleep(self.exc)
            else:
                raise self.exc
        return type("Out", (), {"loss": (self.w * inputs.float().mean()).sum()})()


def test_a_warm_up_catches_its_own_cap_and_lets_the_sections_pass(tmp_path):
    check = gpu_check.Check(torch.device("cpu"), gpu_check.SHAPES["tiny"], tmp_path, Clock())
    tokens = torch.ones(1, 3, dtype=torch.long)
    own = gpu_step.StepConfig("hc", None, "eager", StubModel(fail_at=1, exc=10.0))
    gpu_step.warm_up(check, own, tokens, seconds=1)
    assert own.error == "warm-up steps did not finish: SectionTimeout: over its cap of 1 s"
    sections = gpu_step.StepConfig("hc", None, "eager", StubModel(fail_at=1, exc=10.0))
    with pytest.raises(SectionTimeout, match="over its cap of 0 s"):
        with hard_cap(0.3):
            gpu_step.warm_up(check, sections, tokens, seconds=30)


def test_timing_rounds_drop_a_failing_configuration_and_stop_at_the_cap():
    tokens = torch.ones(1, 3, dtype=torch.long)
    ok, bad = (gpu_step.StepConfig("baseline", None, "eager", StubModel()),
               gpu_step.StepConfig("hc", None, "eager", StubModel(fail_at=2, exc=RuntimeError("CUDA out of memory"))))
    gpu_step.interleaved_rounds([ok, bad], tokens, 3, torch.bfloat16)
    assert len(ok.times) == 3 and ok.error is None and ok.loss == 2.0
    assert bad.error == "timing failed: RuntimeError: CUDA out of memory" and bad.times == [] and bad.model is None
    first, late = (gpu_step.StepConfig("baseline", None, "eager", StubModel()),
                   gpu_step.StepConfig("mhc", "triton", "eager", StubModel(fail_at=3, exc=SectionTimeout("cap"))))
    gpu_step.interleaved_rounds([first, late], tokens, 4, torch.bfloat16)  # late runs first in odd rounds
    assert (len(first.times), len(late.times)) == (3, 2)
    assert first.error == "timed in 3 of 4 rounds: the section's cap came first"
    assert late.error == "timed in 2 of 4 rounds: the section's cap came first"


# --------------------------------------------------------------------------------------------
# Time keeping
# --------------------------------------------------------------------------------------------


def test_repeats_fit_the_estimate_between_least_and_most():
    clock = Clock()
    allowance = Allowance(clock, estimate_s=10.0, cap_s=20.0)
    assert allowance.repeats(1.0, items_left=2, most=20, least=3) in (4, 5)  # ~10 s / 2 items / 1 s
    assert allowance.repeats(0.001, items_left=1, most=20) == 20
    assert allowance.repeats(100.0, items_left=1, most=20, least=3) == 3


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="caps use SIGALRM")
def test_caps_nest_and_the_enclosing_one_is_rearmed():
    with pytest.raises(SectionTimeout, match="over its cap of 0 s"):
        with hard_cap(0.2):
            time.sleep(5)
    with hard_cap(30):
        with hard_cap(0.1):
            pass
        left = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 25 < left <= 30  # re-armed with what was left
        with hard_cap(60):  # ends after the enclosing cap: not set
            assert signal.getitimer(signal.ITIMER_REAL)[0] <= 30
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0


# --------------------------------------------------------------------------------------------
# The production table
# --------------------------------------------------------------------------------------------


def test_production_table_fits_eight_minutes_and_names_what_exists(composer):
    from mhc_train.bench import ops as bench_ops
    from mhc_train.bench.gpu_train_run import train_command
    from mhc_train.model import load_model_config
    from mhc_train.train.config import validate

    s = gpu_check.SHAPES["production"]
    assert (s.batch, s.seq, s.widths, s.n, s.stream_dtype) == (4, 8192, (1280, 2560, 7168), 4, torch.bfloat16)
    for shapes in gpu_check.SHAPES.values():
        assert set(shapes.budget) == set(SECTION_NAMES)
        assert all(0 < estimate <= cap for estimate, cap in shapes.budget.values())
        assert set(shapes.bandwidth_ops) <= set(bench_ops.op_table(4, 8, 20, 2))
        assert set(shapes.compile_residuals) <= set(gpu_step.RESIDUALS)
    assert sum(cap for _, cap in s.budget.values()) <= s.budget_s <= 8 * 60 - 10
    assert set(s.compile_residuals) == set(gpu_step.RESIDUALS)
    cfg = load_model_config(s.step_model, **s.step_overrides)
    assert (cfg.dim, cfg.n_layers) == (1280, 2) and s.step_seq <= cfg.max_seq_len
    check = gpu_check.Check(torch.device("cuda"), s, Path("/tmp/gpu-check"), Clock())
    overrides = train_command(check)[3:]  # after "python -m mhc_train.train"
    assert {"model=small", "train.steps=50", "train.device=cuda"} <= set(overrides)
    validate(composer(*overrides))  # the trainer accepts every override
