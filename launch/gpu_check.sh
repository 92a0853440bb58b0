#!/usr/bin/env bash
# The one-command GPU check (docs/benchmarks.md): kernels against the reference at production
# shapes, kernel bandwidth, Sinkhorn, baseline / HC / mHC step time and memory, a 50-step training
# run; under 8 minutes on one H100 / H200. Writes gpu_report.json and gpu_report.md.
#
#   bash launch/gpu_check.sh                   # reports in runs/gpu_check/
#   bash launch/gpu_check.sh --out /tmp/check
#
#   bash launch/gpu_check.sh --preflight       # versions, GPU, modules: seconds
#
# Environment:
#   PY   python with torch and triton (default: .venv/bin/python, else python3); mhc-train need
#        not be installed: the checkout is put on PYTHONPATH, kernels/ linked as mhc_kernels
# Without a GPU it prints one line and exits 0. Exit code 1: some section did not pass (the
# reports say which), or nvidia-smi lists a GPU that torch cannot use.
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
# kernels/ is the package mhc_kernels only through pyproject's package-dir mapping (an editable
# install): without one, a link of that name in a temporary folder (left behind: exec below keeps
# the python process in the foreground, where an outer timeout's signal reaches it).
if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("mhc_kernels") is None)' 2>/dev/null; then
  shim="$(mktemp -d "${TMPDIR:-/tmp}/mhc-kernels.XXXXXX")"
  ln -s "$root/kernels" "$shim/mhc_kernels"
  export PYTHONPATH="$shim:$PYTHONPATH"
fi
# Autotune results cached on disk (Triton >= 3.4 reads this; older ones ignore it): a shape tuned
# once is not tuned again by the training run's process or by the next check on this machine.
export TRITON_CACHE_AUTOTUNING="${TRITON_CACHE_AUTOTUNING:-1}"
# One or two autotune configs per kernel (kernels/_common.py quick_autotune): the full search
# over every width, dtype and flag would take minutes of the 8. MHC_AUTOTUNE=full for tuned figures.
export MHC_AUTOTUNE="${MHC_AUTOTUNE:-quick}"
export PYTHONUNBUFFERED=1
exec "$PY" -m mhc_train.bench.gpu_check "$@"
