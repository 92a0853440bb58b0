#!/usr/bin/env bash
# Regenerate docs/reproduction.md: the small-scale runs (CPU is enough), then every figure.
#
#   bash launch/reproduce.sh                 # runs into runs/, figures into docs/figures/repro_*.png
#   PLOTS_ONLY=1 bash launch/reproduce.sh    # only redraw the figures from existing runs
#
# A run that already finished is skipped (resume=auto finds its final checkpoint and returns), a
# run that was interrupted continues from its last checkpoint: after a crash or Ctrl-C, run the
# same command again. Environment:
#   PY       python with mhc-train installed (default: .venv/bin/python, else python3)
#   OUT      root of the run directories (default: runs)
#   FIGS     where the figures go (default: docs/figures); summaries go to $OUT/summary
#   LANES    sweeps run side by side (default 2, one per core); THREADS torch threads per run (1)
#   WANDB=1  also log to W&B (group = experiment name; offline without an API key)
#   EXTRA    more overrides for every run (e.g. "train.device=cuda")
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
PY="${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
OUT="${OUT:-runs}"
FIGS="${FIGS:-docs/figures}"
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

# Each lane runs its experiments one after another; the lanes run side by side.
lane_a() {
  # Fig 3/7/8 (and 2/5 at a high learning rate): 6 blocks, lr 1e-2.
  train stability -m experiment=stability
  # n sweep, HC and mHC (and with it the main HC / mHC / baseline comparison at n = 4)
  train sweep_n_baseline experiment=sweep_n residual=baseline
  train sweep_n -m experiment=sweep_n
}
lane_b() {
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
  echo "reproduce: runs done in $(( $(date +%s) - start )) s" >&2
fi

plot() {  # plot PREFIX ARGS... : mhc-plot into $FIGS with file names repro_PREFIX_*.png
  local prefix="$1"; shift
  "$PY" -m mhc_train.analysis "$@" -o "$FIGS" --prefix "repro_${prefix}_"
}
summary() {  # summary NAME SOURCES... : summary.md / .json under $OUT/summary
  local name="$1"; shift
  "$PY" -m mhc_train.analysis "$@" -o "$OUT/summary" --prefix "${name}_" --figures summary >/dev/null
}
n4=("$OUT"/sweep_n/tiny-baseline-n1* "$OUT"/sweep_n/tiny-hc-n4+* "$OUT"/sweep_n/tiny-mhc-n4+*)
plot main "${n4[@]}" --figures loss_gap,grad_norm
plot stability "$OUT/stability" --figures loss_gap,grad_norm,gains,gains_by_step,h_res
plot sweep_n "$OUT/sweep_n" --figures sweep,gains
plot sweep_tmax "$OUT/sweep_tmax" --figures sweep
plot ablation "$OUT/ablation" --figures ablation
plot scaling "$OUT/scaling" --figures scaling
for e in stability sweep_n sweep_tmax ablation scaling; do summary "$e" "$OUT/$e"; done
summary main "${n4[@]}"
echo "reproduce: done in $(( $(date +%s) - start )) s; figures in $FIGS/repro_*.png, tables in $OUT/summary/*.md" >&2
