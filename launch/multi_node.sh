#!/usr/bin/env bash
# Training over several nodes with torchrun's c10d rendezvous. Run this same
# command on every node (by hand, pdsh, or launch/slurm.sbatch, which fills the variables in).
#
#   MASTER_ADDR=node0 NNODES=4 NODE_RANK=0 bash launch/multi_node.sh model=27b parallel=fsdp   # on node0
#   MASTER_ADDR=node0 NNODES=4 NODE_RANK=1 bash launch/multi_node.sh model=27b parallel=fsdp   # on node1 ...
#   PP=4 EP=8 NNODES=4 ... bash launch/multi_node.sh model=27b parallel.pipeline.schedule=dualpipev \
#       parallel.pipeline.microbatches=16 train.batch_size=16                     # 32 GPUs: pp=4 x dp_shard=8 (ep=8 within a node)
#
# Environment (SLURM's are used when the plain ones are absent):
#   MASTER_ADDR   rendezvous host (default: first host of $SLURM_JOB_NODELIST, else localhost)
#   MASTER_PORT   rendezvous port (default 29500)
#   NNODES        nodes (default: $SLURM_NNODES, else 1)
#   NODE_RANK     this node's index (default: $SLURM_NODEID, else 0); c10d does not need it to
#                 be right, but logs are easier to read when it is
#   NPROC         processes per node (default: GPUs of this node, else 1)
#   RDZV_ID       a job id shared by all nodes (default: $SLURM_JOB_ID, else mhc-train)
#   PARALLEL      ddp (default) | fsdp | deepspeed | pipeline | mesh
#   PP DP_REPLICATE DP_SHARD EP   mesh degrees -> parallel.pp=... (any set: PARALLEL defaults to mesh)
#   PY            python with mhc-train installed
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}"
if [ -z "${MASTER_ADDR:-}" ]; then
  if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null; then
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
  else
    MASTER_ADDR=localhost
  fi
fi
MASTER_PORT="${MASTER_PORT:-29500}"
NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-mhc-train}}"
if [ -z "${NPROC:-}" ]; then
  NPROC="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  [ "${NPROC:-0}" -ge 1 ] || NPROC=1
fi
source "$root/launch/_degrees.sh"
# Restarted workers (--max-restarts) must not reuse the previous attempt's rendezvous store:
# with it, gloo connects to dead peers' addresses (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
echo "multi_node: node $NODE_RANK of $NNODES, $NPROC processes, rendezvous $MASTER_ADDR:$MASTER_PORT ($RDZV_ID)" >&2
exec "$PY" -m torch.distributed.run --max-restarts="${MAX_RESTARTS:-0}" --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID" \
  -m mhc_train.train parallel="$PARALLEL" ${degree_args[@]+"${degree_args[@]}"} "$@"
