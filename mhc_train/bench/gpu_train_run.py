"""GPU check, training: a short run of the real trainer (``python -m mhc_train.train``) in a
subprocess, on the check's device, with its outputs under ``<out>/train``.

Its metrics.jsonl gives the first and last loss and the step time (the median over the steps
after the first: the first holds the kernels' self-test and the allocator's warm-up). The run
passes when the trainer exits 0, every loss is finite and the last is below the first.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from mhc_train.bench.gpu_report import tail

ROOT = Path(__file__).resolve().parents[2]


def train_command(check) -> list[str]:
    out = (check.out / "train").resolve()
    return [sys.executable, "-m", "mhc_train.train", *check.shapes.train_args, f"output_root={out}",
            "run_name=gpu-check", "resume=none", f"train.device={check.device.type}", "train.gains_every=0",
            "train.checkpoint_every=0", "logging.progress=false", "logging.plots=false"]


def read_train_records(out: Path) -> tuple[Path | None, list[dict]]:
    """(run directory, metrics records) of the newest run below ``out``; resume=none moved the
    previous run's files into a replaced-* folder, which is not it."""
    files = [f for f in out.glob("**/metrics.jsonl") if not f.parent.name.startswith("replaced-")]
    if not files:
        return None, []
    newest = max(files, key=lambda f: f.stat().st_mtime)
    return newest.parent, [json.loads(line) for line in newest.read_text().splitlines() if line.strip()]


def run_training(check) -> dict:
    command = train_command(check)
    check.say("train: " + " ".join(command[1:]))
    timeout = max(1.0, check.allowance.cap_s - check.allowance.used() - 2.0)
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:  # the child is killed by now; say how far it got
        code = None
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
    run_dir, records = read_train_records(check.out / "train")
    steps = [r for r in records if r.get("kind") == "train"]
    vals = [r["val_loss"] for r in records if r.get("kind") == "val"]
    result = {"command": " ".join(command[1:]), "exit_code": code, "steps": len(steps)}
    if code != 0 or not steps:
        why = f"the trainer exited {code}" if code is not None else f"the trainer did not finish in {timeout:.0f} s"
        result["error"] = f"{why} after {len(steps)} steps"
        result["stderr_tail"] = tail(stderr)
        last_line = (result["stderr_tail"].splitlines() or [""])[-1]
        result["summary"] = [f"`{result['command']}`", f"stderr ends: {last_line}"]
        return {"passed": False, **result}
    losses = [float(r["loss"]) for r in steps]
    later = [r["step_time_s"] for r in steps[1:]] or [steps[0]["step_time_s"]]
    mfu = [r["mfu"] for r in steps[1:] if "mfu" in r]
    result.update(first_loss=losses[0], last_loss=losses[-1], val_loss=vals[-1] if vals else None,
                  first_step_s=steps[0]["step_time_s"], step_time_ms=statistics.median(later) * 1e3,
                  tokens_per_s=statistics.median(r["tokens_per_s"] for r in steps[1:] or steps),
                  mfu=statistics.median(mfu) if mfu else None, run_dir=str(run_dir))
    finite = all(math.isfinite(v) for v in losses)
    result["rows"] = [{k: result[k] for k in ("steps", "first_loss", "last_loss", "val_loss", "first_step_s",
                                              "step_time_ms", "tokens_per_s", "mfu")}]
    result["summary"] = [f"`{result['command']}`",
                         f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(steps)} steps; "
                         f"{result['step_time_ms']:.1f} ms per step after the first ({result['first_step_s']:.1f} s)"]
    return {"passed": finite and losses[-1] < losses[0], **result}
