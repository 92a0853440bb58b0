#!/usr/bin/env bash
# A sweep over the expansion rate n and the Sinkhorn iterations t_max, one data-parallel run
# per combination, one after another, all in the same W&B group (offline without an API key).
#
#   bash launch/sweep_example.sh                         # every GPU of this node per run
#   NPROC=2 NS="2 4" TMAXS="5 20" bash launch/sweep_example.sh model=tiny train.steps=50
#
# The same sweep in one process, without torchrun: mhc-train -m residual.n=2,4,8 residual.t_max=5,20
# (configs/experiment/sweep_n.yaml and sweep_tmax.yaml are ready-made ones). Each run lands in
# runs/<experiment>/<run_name>+... like a single run with the same overrides, so re-running this
# script skips finished runs and continues interrupted ones (resume=auto).
# Environment: NS, TMAXS (the values), EXPERIMENT (default sweep_n_tmax), WANDB=0 to turn W&B off;
# NPROC, PARALLEL, PY as in launch/single_node.sh.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
NS="${NS:-2 4 8}"
TMAXS="${TMAXS:-5 20}"
EXPERIMENT="${EXPERIMENT:-sweep_n_tmax}"
wandb=()
[ "${WANDB:-1}" = 1 ] && wandb=(logging=wandb)
for n in $NS; do
  for t in $TMAXS; do
    echo "sweep: residual=mhc residual.n=$n residual.t_max=$t" >&2
    bash "$root/launch/single_node.sh" residual=mhc residual.n="$n" residual.t_max="$t" \
      experiment.name="$EXPERIMENT" "${wandb[@]}" "$@"
  done
done
