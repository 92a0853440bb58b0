"""Golden losses: the first steps of the tiny model, committed, so any change to the numerics shows.

    python -m mhc_train.train.golden            # train the reference runs, compare with the file
    python -m mhc_train.train.golden --write    # regenerate tests/golden/losses.json on purpose

Each reference run is the tiny model in fp32 on the CPU (deterministic algorithms, one thread)
on the bundled corpus: baseline, HC and mHC in one process, and mHC through a 2-stage pipeline
(torchrun, gloo). The file holds the training loss of every step; ``compare`` names the first
step of each run that moved by more than ``TOLERANCE`` (tests/test_golden_losses.py runs it).
A change that is meant to move the numbers regenerates the file in the same commit, so the
review sees the curves change.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "losses.json"
TOLERANCE = 1e-5
STEPS = 20
COMMON = ["model=tiny", "train.seq_len=32", "train.batch_size=4", f"train.steps={STEPS}", "train.precision=fp32",
          "train.device=cpu", "train.deterministic=true", "train.threads=1", "train.eval_every=0",
          "train.gains_every=0", "train.checkpoint_every=0", "logging.progress=false", "logging.plots=false"]
# name -> (overrides, processes)
RUNS = {
    "baseline": (["residual=baseline"], 1),
    "hc": (["residual=hc"], 1),
    "mhc": (["residual=mhc"], 1),
    "mhc_pipeline_pp2": (["residual=mhc", "parallel=pipeline", "model.n_layers=4"], 2),
}


def _command(name: str, out: Path) -> list[str]:
    overrides, procs = RUNS[name]
    args = [*COMMON, *overrides, f"output_root={out}", f"run_name={name}"]
    if procs == 1:
        return [sys.executable, "-m", "mhc_train.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
            "-m", "mhc_train.train", *args]


def train_losses(names: list[str], out: Path) -> dict[str, list[float]]:
    """The training loss of each step of the reference runs ``names`` (trained in ``out``). The
    one-process runs train side by side (one thread each: the same numbers as one at a time),
    the pipeline runs after them."""
    from mhc_train.analysis.runs import read_metrics

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    losses = {}
    for batch in ([n for n in names if RUNS[n][1] == 1], [n for n in names if RUNS[n][1] > 1]):
        procs = {name: subprocess.Popen(_command(name, out), cwd=out, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True) for name in batch}
        for name, proc in procs.items():
            print(f"training {name} ...", file=sys.stderr, flush=True)
            output = proc.communicate(timeout=600)[0]
            if proc.returncode != 0:
                raise RuntimeError(f"{name}: exit {proc.returncode}\n{output[-3000:]}")
            (metrics,) = out.glob(f"default/{name}*/metrics.jsonl")
            losses[name] = [r["loss"] for r in read_metrics(metrics) if r["kind"] == "train"]
            if len(losses[name]) != STEPS:
                raise RuntimeError(f"{name}: {len(losses[name])} training steps logged, {STEPS} expected")
    return losses


def compare(expected: list[float], got: list[float]) -> str | None:
    """Where ``got`` leaves ``expected`` by more than TOLERANCE (None: it does not)."""
    if len(expected) != len(got):
        return f"{len(got)} steps, {len(expected)} in the golden file"
    for step, (want, have) in enumerate(zip(expected, got), start=1):
        if abs(want - have) > TOLERANCE:
            return f"step {step}: loss {have:.7f}, golden {want:.7f} (|diff| {abs(want - have):.2e} > {TOLERANCE:g})"
    return None


def read_golden() -> dict[str, list[float]]:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))["losses"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mhc_train.train.golden", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"regenerate {GOLDEN.relative_to(ROOT)}")
    parser.add_argument("runs", nargs="*", choices=[[], *RUNS], help="runs to train (default: all)")
    args = parser.parse_args(argv)
    names = args.runs or list(RUNS)
    with tempfile.TemporaryDirectory(prefix="mhc-golden-") as tmp:
        got = train_losses(names, Path(tmp))
    if args.write:
        import torch

        losses = {**(read_golden() if GOLDEN.is_file() else {}), **got}
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"command": "python -m mhc_train.train.golden --write", "torch": torch.__version__,
                                      "overrides": COMMON, "runs": {k: RUNS[k][0] for k in losses},
                                      "losses": losses}, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {GOLDEN}")
        return
    golden, failed = read_golden(), False
    for name in names:
        problem = compare(golden[name], got[name]) if name in golden else "not in the golden file"
        print(f"{name:18s} {'ok' if problem is None else problem}")
        failed |= problem is not None
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
