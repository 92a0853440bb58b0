"""Run loading and the mHC paper's figures (``mhc-plot``); see docs/reproduction.md.

Reads run logs only (``run_dir/metrics.jsonl``, or W&B when online); never imports the trainer.
"""

from mhc_train.analysis.runs import AnalysisError, Run, load_runs, read_metrics

__all__ = ["AnalysisError", "Run", "load_runs", "read_metrics"]
