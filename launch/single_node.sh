#!/usr/bin/env bash
# Data-parallel training on one machine: one process per GPU (or NPROC CPU processes on gloo).
#
#   bash launch/single_node.sh model=3b residual=mhc                      # every GPU of this node, DDP
#   PARALLEL=fsdp bash launch/single_node.sh model=9b
#   NPROC=2 bash launch/single_node.sh model=tiny train.steps=20          # CPU: 2 processes, gloo
#
# Environment:
#   PY        python with mhc-train installed (default: .venv/bin/python, else python3)
#   NPROC     processes (default: the number of GPUs, else 1)
#   PARALLEL  ddp (default) | fsdp | deepspeed | pipeline   -> parallel=$PARALLEL
#   THREADS   torch threads per process on CPU (default 1; OMP spin-waits, see docs/training.md)
# Every argument is a Hydra override of mhc-train (docs/training.md). train.batch_size is per
# process: the global batch is NPROC x train.batch_size x train.grad_accum.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}"
if [ -z "${NPROC:-}" ]; then
  NPROC="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  [ "${NPROC:-0}" -ge 1 ] || NPROC=1
fi
PARALLEL="${PARALLEL:-ddp}"
# Restarted workers (--max-restarts) must not reuse the previous attempt's rendezvous store:
# with it, gloo connects to dead peers' addresses (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${THREADS:-1}}"
extra=()
if ! nvidia-smi -L >/dev/null 2>&1; then
  extra+=(train.threads="${THREADS:-1}")
fi
exec "$PY" -m torch.distributed.run --max-restarts="${MAX_RESTARTS:-0}" --standalone --nnodes=1 --nproc_per_node="$NPROC" \
  -m mhc_train.train parallel="$PARALLEL" "${extra[@]}" "$@"
