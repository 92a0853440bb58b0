#!/usr/bin/env bash
# The one-command GPU check (docs/benchmarks.md): kernels against the reference at production
# shapes, kernel bandwidth, Sinkhorn, baseline / HC / mHC step time and memory, a 50-step training
# run; under 8 minutes on one H100 / H200. Writes gpu_report.json and gpu_report.md.
#
#   bash launch/gpu_check.sh                   # reports in runs/gpu_check/
#   bash launch/gpu_check.sh --out /tmp/check
#
# Environment:
#   PY   python with mhc-train installed (default: .venv/bin/python, else python3)
# Without a GPU it prints one line and exits 0. Exit code 1: some section did not pass (the
# reports say which).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}"
if [ -n "${TRITON_INTERPRET:-}" ] && [ "${TRITON_INTERPRET}" != "0" ]; then
  # Inherited from a test shell, it would run every kernel in Triton's interpreter (~1000x slower).
  echo "gpu_check.sh: unsetting TRITON_INTERPRET=${TRITON_INTERPRET} (the kernels must compile for the GPU)" >&2
  unset TRITON_INTERPRET
fi
# Importable from a checkout that is not installed; --out stays relative to where it was called.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PY" -m mhc_train.bench.gpu_check "$@"
