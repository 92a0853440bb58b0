#!/usr/bin/env bash
# Regenerate docs/reproduction.md: the small-scale runs (CPU is enough), every figure, the JSON
# summaries of the results (docs/results/<experiment>.json) and every number of the doc from them.
#
#   bash launch/reproduce.sh                 # runs into runs/, figures into docs/figures/repro_*.png
#   PLOTS_ONLY=1 bash launch/reproduce.sh    # only redraw the figures and summaries from existing runs
#
# A run that already finished is skipped (resume=auto finds its final checkpoint and returns), a
# run that was interrupted continues from its last checkpoint: after a crash or Ctrl-C, run the
# same command again. Environment:
#   PY       python with mhc-train installed (default: .venv/bin/python, else python3)
#   OUT      root of the run directories (default: runs)
#   FIGS     where the figures go (default: docs/figures)
#   RESULTS  where the JSON summaries go (default: docs/results); DOC the doc (docs/reproduction.md)
#   LANES    sweeps run side by side (default 2, one per core); THREADS torch threads per run (1)
#   WANDB=1  also log to W&B (group = experiment name; offline without an API key)
#   EXTRA    more overrides for every run (e.g. "train.device=cuda")
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
PY="${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
OUT="${OUT:-runs}"
FIGS="${FIGS:-docs/figures}"
RESULTS="${RESULTS:-docs/results}"
DOC="${DOC:-docs/reproduction.md}"
LANES="${LANES:-2}"
THREADS="${THREADS:-1}"
common=(train.threads="$THREADS" logging.progress=false output_root="$OUT")
[ "${WANDB:-0}" = 1 ] && common+=(logging=wandb)
# shellcheck disable=SC2206
[ -n "${EXTRA:-}" ] && common+=(${EXTRA})
mkdir -p "$OUT/logs"
start=$(date +%s)

train() {  # train LOG ARGS... : one mhc-train command, its output in $OUT/logs/LOG.log
  local log="$OUT/logs/$1.log"; shift
  # Every run of the command complete already: skip it without starting the trainer (a
  # relaunched mhc-train would skip them too, one by one, after building each model).
  if "$PY" -m mhc_train.analysis.sweeps "$@" "${common[@]}" 2>/dev/null | tail -1 \
       | grep -Eq '^([0-9]+) jobs, \1 complete'; then
    echo "reproduce: mhc-train $*: complete already" >&2
    return 0
  fi
  echo "reproduce: mhc-train $* (log: $log)" >&2
  "$PY" -m mhc_train.train "$@" "${common[@]}" >"$log" 2>&1 || {
    echo "reproduce: FAILED: mhc-train $* (last lines of $log:)" >&2; tail -5 "$log" >&2; return 1; }
}

train_each() {  # train_each LOG ARGS... : each job of the sweep as its own mhc-train run
  # At a high learning rate a run may diverge: the trainer stops it after consecutive non-finite
  # updates (exit code 3). That is a result here (the summaries record it), but inside one
  # Hydra multirun it would cancel the jobs after it, so these sweeps run job by job; a stopped
  # run is kept (relaunching it would only diverge again).
  local log="$OUT/logs/$1.log"; shift
  local plan line args rc
  plan=$("$PY" -m mhc_train.analysis.sweeps "$@" "${common[@]}" 2>/dev/null) \
    || { echo "reproduce: FAILED to expand: $*" >&2; return 1; }
  while IFS= read -r line; do
    case "$line" in complete*|stopped*|*" jobs, "*) continue ;; esac
    args="${line##*\[}"; args="${args%]}"
    echo "reproduce: mhc-train $args (log: $log)" >&2
    rc=0
    # shellcheck disable=SC2086
    "$PY" -m mhc_train.train $args >>"$log" 2>&1 || rc=$?
    if [ "$rc" = 3 ]; then
      echo "reproduce: $args: stopped by non-finite updates (diverged); kept as a result" >&2
    elif [ "$rc" != 0 ]; then
      echo "reproduce: FAILED: mhc-train $args (last lines of $log:)" >&2; tail -5 "$log" >&2; return 1
    fi
  done <<< "$plan"
}

# Each lane runs its experiments one after another; the lanes run side by side (about equal
# CPU time each: the 12-block instability runs are the longest).
lane_a() {
  # HC's instability in the loss and grad norm: 12 blocks, lr 3e-2, 3 seeds (seed 2 in lane b)
  train_each instability_s01 -m experiment=instability train.seed=0,1
  # Fig 3/7/8 (and 2/5 at a high learning rate): 6 blocks, lr 1e-2, 3 seeds
  train_each stability -m experiment=stability train.seed=0,1,2
}
lane_b() {
  train_each instability_s2 -m experiment=instability train.seed=2
  # n sweep, HC and mHC (and with it the main HC / mHC / baseline comparison at n = 4)
  train sweep_n_baseline experiment=sweep_n residual=baseline
  train sweep_n -m experiment=sweep_n
  train sweep_tmax_baseline experiment=sweep_tmax residual=baseline
  train sweep_tmax -m experiment=sweep_tmax
  train ablation_baseline experiment=ablation residual=baseline
  train ablation -m experiment=ablation
  # two more seeds of the n = 4 comparison: how large is seed noise next to the gaps?
  train seeds_baseline -m experiment=sweep_n residual=baseline residual.n=1 train.seed=1,2
  train seeds -m experiment=sweep_n residual=hc,mhc residual.n=4 train.seed=1,2
}
lane_c() {
  train scaling -m experiment=scaling
}

if [ "${PLOTS_ONLY:-0}" != 1 ]; then
  # What the summaries record of the runs (mhc-plot-results write reads these): the commit they
  # were trained at (of the first pass into $OUT) and the wall time of every pass, summed.
  [ -s "$OUT/commit" ] || git rev-parse --short HEAD >"$OUT/commit" 2>/dev/null || true
  pids=()
  if [ "$LANES" -ge 2 ]; then
    (lane_a; lane_c) & pids+=($!)
    lane_b & pids+=($!)
  else
    (lane_a; lane_b; lane_c) & pids+=($!)
  fi
  failed=0
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  [ "$failed" = 0 ] || { echo "reproduce: some runs failed (see $OUT/logs); figures not redrawn" >&2; exit 1; }
  secs=$(( $(date +%s) - start ))
  echo $(( secs + $(cat "$OUT/runs_seconds" 2>/dev/null || echo 0) )) >"$OUT/runs_seconds"
  echo "reproduce: runs done in $secs s" >&2
fi

plot() {  # plot PREFIX ARGS... : mhc-plot into $FIGS with file names repro_PREFIX_*.png
  local prefix="$1"; shift
  "$PY" -m mhc_train.analysis "$@" -o "$FIGS" --prefix "repro_${prefix}_"
}
n4=("$OUT"/sweep_n/tiny-baseline-n1* "$OUT"/sweep_n/tiny-hc-n4+* "$OUT"/sweep_n/tiny-mhc-n4+*)
plot main "${n4[@]}" --figures loss_gap,grad_norm
plot instability "$OUT/instability" --figures loss_gap,grad_norm,gains_by_step
plot stability "$OUT/stability" --figures loss_gap,grad_norm,gains,gains_by_step
plot stability "$OUT"/stability/*train.seed:0 --figures h_res   # one seed: the maps are per run
plot sweep_n "$OUT/sweep_n" --figures sweep,gains
plot sweep_tmax "$OUT/sweep_tmax" --figures sweep
plot ablation "$OUT/ablation" --figures ablation
plot scaling "$OUT/scaling" --figures scaling
# Results as data: one JSON summary per experiment, then every number of the doc from them.
"$PY" -m mhc_train.analysis.results write "$OUT" -o "$RESULTS"
"$PY" -m mhc_train.analysis.results doc --results "$RESULTS" --doc "$DOC"
echo "reproduce: done in $(( $(date +%s) - start )) s; figures in $FIGS/repro_*.png, summaries in $RESULTS, $DOC regenerated" >&2
