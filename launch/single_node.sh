#!/usr/bin/env bash
# Training on one machine: one process per GPU (or NPROC CPU processes on gloo).
#
#   bash launch/single_node.sh model=3b residual=mhc                      # every GPU of this node, DDP
#   PARALLEL=fsdp bash launch/single_node.sh model=9b
#   EP=8 bash launch/single_node.sh model=3b                              # mesh: FSDP over 8, experts over 8
#   PP=2 EP=4 bash launch/single_node.sh model=3b parallel.pipeline.schedule=dualpipev parallel.pipeline.microbatches=8
#   NPROC=2 bash launch/single_node.sh model=tiny train.steps=20          # CPU: 2 processes, gloo
#
# Environment:
#   PY        python with mhc-train installed (default: .venv/bin/python, else python3)
#   NPROC     processes (default: the number of GPUs, else 1)
#   PARALLEL  ddp (default) | fsdp | deepspeed | pipeline | mesh   -> parallel=$PARALLEL
#   PP DP_REPLICATE DP_SHARD EP   mesh degrees -> parallel.pp=... (any set: PARALLEL defaults to mesh;
#             docs/distributed.md; mhc-train-plan lists the layouts that fit a cluster)
#   THREADS   torch threads per process on CPU (default 1; OMP spin-waits, see docs/training.md)
# Every argument is a Hydra override of mhc-train (docs/training.md). train.batch_size is per
# data rank: the global batch is (NPROC / PP) x train.batch_size x train.grad_accum.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}"
if [ -z "${NPROC:-}" ]; then
  NPROC="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  [ "${NPROC:-0}" -ge 1 ] || NPROC=1
fi
source "$root/launch/_degrees.sh"
# Restarted workers (--max-restarts) must not reuse the previous attempt's rendezvous store:
# with it, gloo connects to dead peers' addresses (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${THREADS:-1}}"
extra=()
if ! nvidia-smi -L >/dev/null 2>&1; then
  extra+=(train.threads="${THREADS:-1}")
fi
exec "$PY" -m torch.distributed.run --max-restarts="${MAX_RESTARTS:-0}" --standalone --nnodes=1 --nproc_per_node="$NPROC" \
  -m mhc_train.train parallel="$PARALLEL" ${degree_args[@]+"${degree_args[@]}"} "${extra[@]}" "$@"
