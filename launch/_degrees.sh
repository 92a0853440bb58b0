# Sourced by single_node.sh and multi_node.sh: the mesh degrees from the environment.
#   PP, DP_REPLICATE, DP_SHARD, EP   -> parallel.pp= ... parallel.ep= (any of them set: parallel=mesh
#                                       unless PARALLEL says otherwise; -1 = what is left of the world)
# Sets PARALLEL (default ddp without degrees) and the array degree_args.
degree_args=()
for key in PP DP_REPLICATE DP_SHARD EP; do
  value="${!key:-}"
  if [ -n "$value" ]; then
    degree_args+=("parallel.$(echo "$key" | tr '[:upper:]' '[:lower:]')=$value")
  fi
done
if [ "${#degree_args[@]}" -gt 0 ]; then
  PARALLEL="${PARALLEL:-mesh}"
else
  PARALLEL="${PARALLEL:-ddp}"
fi
