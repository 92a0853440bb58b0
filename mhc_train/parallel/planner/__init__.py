"""Which mesh layouts fit a cluster, and what they cost: bytes per GPU and communication per step
(``mhc-train-plan``; the command line is ``plan_cli``). Estimates only: nothing is allocated and
no process group is made.

    layouts = enumerate_layouts(ctx, cluster)              # every layout the mesh can build
    estimates = [estimate(ctx, cluster, lay) for lay in layouts]
    result = plan(model_cfg, residual_cfg, cluster, seq_len, global_batch)   # both, ranked

A layout is the mesh degrees (``mesh.resolve_degrees``: world = pp x dp_replicate x dp_shard,
ep | dp_shard, ep | routed experts), the pipeline schedule (``pipeline.validate_pipeline``),
the micro-batch size (global batch = data ranks x micro-batch x micro-batches), residual
recomputation on / off and FSDP2's ``reshard_after_forward``.

Bytes per GPU (the worst pipeline rank), training on a GPU in bf16 autocast with fp32 master
weights, fp32 gradients and AdamW (``precision="bf16"``; ``"fp32"`` is what a CPU runs):

    params            fp32 master weights: non-expert ones sharded over the data ranks that shard
                      them (dp_shard), routed experts E/ep per rank sharded over dp_shard/ep (a
                      dimension of size 1 drops out of the mesh FSDP gets: with dp_shard/ep = 1
                      and dp_replicate > 1 the experts shard over dp_replicate, as
                      ``ParallelMesh.expert_data_mesh`` builds it)
    params_unsharded  bf16 copies alive during compute: FSDP2's gathered blocks (two blocks in
                      flight with reshard_after_forward, the root's embedding/head, the whole
                      rank without it or under a pipeline, whose backward does not reshard
                      until the last micro-batch; the embedding is gathered in fp32,
                      ``data_parallel.shard_model``); autocast's bf16 casts where nothing shards
    grads             fp32, sharded like params
    grad_accumulation the unsharded fp32 gradients FSDP2 accumulates while a step runs several
                      micro-batches without reduce-scatter (the trainer syncs once per step, so
                      do torch's pipeline stages): 4 bytes per parameter it gathers
    optimizer         AdamW: two fp32 moments, sharded like params
    activations       what one micro-batch keeps for backward on this rank (``ActivationBytes``,
                      the formula calibrated on CPU, below)
    activations_in_flight  the further micro-batches alive at the schedule's peak: the pipeline
                      simulator's peak count (``simulator.evaluate``) times one micro-batch
    all_to_all        expert-parallel dispatch + combine buffers of one MoE layer (send and
                      receive), twice under dualpipev (a forward and a backward chunk overlap)
    transient         the largest short-lived buffer: logits gradient on the last stage, or the
                      recomputed block of residual-stream ops in backward
    total             the sum; it fits when <= gpu_mem_gb GiB x (1 - headroom), headroom 10% by
                      default: CUDA context, NCCL buffers and allocator fragmentation

The activation model (bytes per token kept for backward), derived op by op from what autograd
saves in this code base and checked against ``mhc_train.bench.memory_report`` measurements on CPU
(``measure_activation_bytes``; tests/test_planner.py): per sublayer, residual part + layer part,
plus the embedding and head. Per token, C = dim, n = streams, W = n^2 + 2n, in bytes:

    residual (read, pre-norm, write; not recomputed) - s = bytes per stream element
    (``residual.stream_dtype``: 2 in a bf16 run by default, 4 in fp32) (a = the normed sublayer
    input, in the streams' dtype, which F keeps: sC, or 0 for fp32 streams under autocast, where F
    keeps bf16 copies in its own part; y = the sublayer output, bf16 under autocast except the
    MoE's, combined in its input's dtype: s per element):
      baseline  sC + 4 + 4C + a                    (stream, rsqrt, normalised; the add keeps nothing)
      mhc       snC + 4W + 4 + 8n + sC + 4C + 4 + a + y  (streams, projection, 1/r, logits, H_pre,
                                                     H_post; u, rsqrt, normalised; y for H_post^T y)
      hc        snC + u + 4n + 4nC + 4nC + t(n(n+1) + n) + 4n(n+1) + 4n + sC + 4C + 4 + a + y
                (streams, their fp32 copy for the per-stream norm u = 4nC when s = 2, rsqrt,
                 normalised, its output in fp32 or its two bf16 casts; tanh t = 4 or 2; the maps;
                 the pre-norm of u); static HC: snC + sC + 4C + 4 + a + y
    residual with recomputation (block of L_r sublayers, restarting at each stage): snC per
      block (its input x_l0) + y per sublayer (hc, mhc; the baseline's write keeps nothing)
    layer parts under bf16 autocast, for a bf16 input (bf16 streams); an fp32 input adds F's
      bf16 casts of it (attention 4C, dense 4C; the MoE: 6C + 2E + 28k + 2 + 8kC + 8kF_e + 8F_s + 4C)
    attention  fp32: 4(kv+r) + 4 + 8kv + sdpa + 4 h dv    bf16: 8kv + 4 + sdpa + 2 h dv
      (kv = kv_lora_rank, r = rope dim; q-LoRA adds its own norm likewise)
      sdpa fused (flash / memory-efficient, GPU): e(2 h dqk + h(dn + dv) + h dv) + 4h
      sdpa math (CPU: q, k, v in fp32 and the probabilities, h S per token): 4(2 h dqk + h S + h dv)
    dense FFN (hidden F)  fp32: 16F    bf16: 8F
    MoE (k of E experts, hidden F_e, shared hidden F_s)
      fp32: 4E + 32k + 4 + 12kC + 16kF_e + 16F_s
      bf16: 4C + 4E + 30k + 4 + 6kC + 8kF_e + 8F_s   (the router's fp32 copy of the input, scores,
            indices, sort order, the sorted rows, the experts' and shared experts' activations)
    first stage 8 (token ids); last stage fp32 12C + 4V + 12, bf16 10C + 4V + 12 (+4nC for a
      learned contraction); a pipeline stage other than the last also keeps its output (snC)

The MoE terms are those of the grouped-GEMM path (``torch._grouped_mm``: CPU, and bf16 on sm90 /
sm100); the per-expert loop casts each expert's rows twice under autocast (+2kC). The mHC terms
are the torch backend's (``mhc_read_res_mix`` / ``apply_post``). On CPU (tiny and small, baseline / HC /
mHC n = 4, recompute off / auto, fp32 and bf16 autocast, math and flash attention) the formula
equals the measurement to the byte; on a GPU the fused-attention branch is the one that was
checked through the CPU's flash kernel (v_head_dim = qk dims), not measured on CUDA.

Communication per GPU per step (bytes; time = intra / intra_gbps + inter / inter_gbps, nothing
overlapped): FSDP all-gathers of bf16 parameters (per micro-batch: twice with
reshard_after_forward, once without; under a pipeline once per step without it), one fp32
reduce-scatter per step, the HSDP all-reduce over dp_replicate, expert all-to-all (dispatch in
the dtype of the normed input, fp32 here, combine bf16; backward the same; the (ep-1)/ep share
that leaves the rank), pipeline activations and gradients ([b, S, n, C] fp32). A collective
whose group spans several nodes counts at the inter-node rate; all-to-all is split per peer.
Ranks are laid out as the mesh builds them: pp outermost, then dp_replicate, dp_shard / ep, ep.

Layout (each file imports only the ones above it):
- ``activations``: the activation model above, per sublayer and stage, and its CPU measurement
  (``measure_activation_bytes``).
- ``context``: ``PlanContext``, what every layout of one model shares: parameter counts, the
  pipeline stages of each rank, schedule simulations.
- ``layouts``: ``Cluster`` and ``enumerate_layouts`` (``Layout``).
- ``comm``: communication per step of one layout; the mesh's groups over ranks and nodes.
- ``estimates``: ``estimate`` of one layout (``Estimate``, ``MEMORY_PARTS``).
- ``ranking``: ``plan``, every layout estimated and ranked (``Plan``, ``rank_key``).

Every name of ``__all__`` is re-exported here: ``from mhc_train.parallel.planner import plan`` works.
"""

from mhc_train.parallel.planner.activations import (
    ATTENTION_KERNELS,
    EMBED_BYTES,
    PRECISIONS,
    ActivationBytes,
    attention_bytes,
    ffn_bytes,
    head_bytes,
    logits_transient_bytes,
    measure_activation_bytes,
    model_activation_bytes,
    recompute_block,
    recompute_kept_bytes,
    recompute_transient_bytes,
    residual_bytes,
    stage_activation_bytes,
)
from mhc_train.parallel.planner.context import ParamCounts, PlanContext, RankStage, parameter_counts
from mhc_train.parallel.planner.estimates import MEMORY_PARTS, Estimate, estimate
from mhc_train.parallel.planner.layouts import GB, GIB, PLAN_SCHEDULES, Cluster, Layout, enumerate_layouts
from mhc_train.parallel.planner.ranking import PAPER_GLOBAL_BATCH, Plan, plan, rank_key

__all__ = [
    "ATTENTION_KERNELS", "ActivationBytes", "Cluster", "EMBED_BYTES", "GB", "GIB", "Estimate", "Layout", "MEMORY_PARTS",
    "PAPER_GLOBAL_BATCH", "PLAN_SCHEDULES", "PRECISIONS", "ParamCounts", "Plan", "PlanContext", "RankStage",
    "attention_bytes", "enumerate_layouts", "estimate", "ffn_bytes", "head_bytes", "logits_transient_bytes",
    "measure_activation_bytes", "model_activation_bytes", "parameter_counts", "plan", "rank_key",
    "recompute_block", "recompute_kept_bytes", "recompute_transient_bytes", "residual_bytes",
    "stage_activation_bytes",
]
