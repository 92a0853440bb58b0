"""Run loading and the mHC paper's figures (``mhc-plot``); see docs/reproduction.md.

Reads run logs only (``run_dir/metrics.jsonl``, or W&B when online); never imports the trainer.

    runs.py          records, runs, loading (JSONL directories, W&B), composite gains
    groups.py        which runs are comparable; baselines; the runs a figure sets aside
    draw.py          canvas, labels, colours, honest axes (clip marks, gain scales, diverging maps)
    figures.py       loss gap, grad norm, scaling, sweeps, ablation
    gain_figures.py  Amax gains against the layer and against the step, H_res maps
    cli.py           mhc-plot
    sweeps.py        the jobs of a sweep and where each stands (mhc-sweep-plan)
"""

from mhc_train.analysis.groups import Grouping
from mhc_train.analysis.runs import AnalysisError, Run, load_runs, read_metrics

__all__ = ["AnalysisError", "Grouping", "Run", "load_runs", "read_metrics"]
