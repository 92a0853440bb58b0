"""Run loading and the mHC paper's figures (``mhc-plot``); see docs/reproduction.md.

Reads run logs only (``run_dir/metrics.jsonl``, or W&B when online); never imports the trainer
(the trainer imports this package, to draw a run's own figures as it goes).

    runs.py          records, runs, loading (JSONL directories, W&B), smoothing, composite gains
    groups.py        which runs are comparable; baselines; the runs a figure sets aside
    stats.py         means over seeds and their t-intervals
    draw.py          canvas, labels, colours, honest axes (clip marks, gain scales, diverging maps)
    figures.py       loss gap, grad norm, scaling, sweeps, ablation; one run's curves; run comparison
    gain_figures.py  Amax gains against the layer and against the step, H_res maps
    results.py       results as data: one JSON summary per reproduction experiment
    results_doc.py   docs/reproduction.md's numbers and tables from those summaries
    cli.py           mhc-plot, mhc-plot-losses, mhc-plot-results
    sweeps.py        the jobs of a sweep and where each stands (mhc-sweep-plan)
"""

from mhc_train.analysis.figures import plot_run
from mhc_train.analysis.gain_figures import plot_gains, plot_h_res
from mhc_train.analysis.groups import Grouping
from mhc_train.analysis.runs import AnalysisError, Run, load_runs, read_metrics

__all__ = ["AnalysisError", "Grouping", "Run", "load_runs", "plot_gains", "plot_h_res", "plot_run", "read_metrics"]
