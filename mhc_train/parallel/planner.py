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

    residual (read, pre-norm, write; not recomputed) - the residual streams stay fp32 (a = the
    normed sublayer input, kept only in fp32: under autocast F keeps bf16 copies instead;
    y = the sublayer output, bf16 under autocast except the MoE's, combined in fp32):
      baseline  4C + 4 + 4C + a                    (stream, rsqrt, normalised; the add keeps nothing)
      mhc       4nC + 8W + 4 + 8n  + 8C + 4 + a + y  (streams, projection, 1/r, logits, H_pre,
                                                     H_post; u, rsqrt, normalised; y for H_post^T y)
      hc        4nC + 4n + 4nC + 4nC + t(n(n+1) + n) + 4n(n+1) + 4n + 8C + 4 + a + y
                (streams, per-stream norm: rsqrt, normalised, its output in fp32 or its two bf16
                 casts; tanh t = 4 or 2; the maps; the pre-norm of u); static HC: 4nC + 8C + 4 + a + y
    residual with recomputation (block of L_r sublayers, restarting at each stage): 4nC per
      block (its input x_l0) + y per sublayer (hc, mhc; the baseline's write keeps nothing)
    attention  fp32: 4(kv+r) + 4 + 8kv + sdpa + 4 h dv    bf16: 4C + 8kv + 4 + sdpa + 2 h dv
      (kv = kv_lora_rank, r = rope dim; q-LoRA adds its own norm likewise)
      sdpa fused (flash / memory-efficient, GPU): e(2 h dqk + h(dn + dv) + h dv) + 4h
      sdpa math (CPU: q, k, v in fp32 and the probabilities, h S per token): 4(2 h dqk + h S + h dv)
    dense FFN (hidden F)  fp32: 16F    bf16: 4C + 8F
    MoE (k of E experts, hidden F_e, shared hidden F_s)
      fp32: 4E + 32k + 4 + 12kC + 16kF_e + 16F_s
      bf16: 6C + 2E + 28k + 2 + 8kC + 8kF_e + 8F_s       (4C of it are the shared experts' casts)
    first stage 8 (token ids); last stage fp32 12C + 4V + 12, bf16 10C + 4V + 12 (+4nC for a
      learned contraction); a pipeline stage other than the last also keeps its output (4nC)

The MoE terms are those of the grouped-GEMM path (``torch._grouped_mm``: CPU, and bf16 on sm90 /
sm100); the per-expert loop casts each expert's rows twice under autocast (+2kC). The mHC terms
are the torch backend's (``ReadResMix`` / ``ApplyPost``). On CPU (tiny and small, baseline / HC /
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from mhc_train.model.config import ModelConfig
from mhc_train.parallel.mesh import MeshConfigError, MeshDegrees, resolve_degrees
from mhc_train.residual.config import ResidualConfig
from mhc_train.residual.recompute import optimal_block_size

PRECISIONS = ("bf16", "fp32")
ATTENTION_KERNELS = ("fused", "math")
PLAN_SCHEDULES = ("1f1b", "zbv", "dualpipev")  # the pipeline runtime's schedules the simulator also has
MEMORY_PARTS = ("params", "params_unsharded", "grads", "grad_accumulation", "optimizer", "activations",
                "activations_in_flight", "all_to_all", "transient")
PAPER_GLOBAL_BATCH = {"3b": 320, "9b": 512, "27b": 1280}  # sequences of 4096 tokens, mHC Table 5
GB = 1e9  # bandwidths and communicated bytes: decimal
GIB = 2**30  # GPU memory: an "80 GB" H100 reports 81559 MiB, so gpu_mem_gb counts GiB


def _check(precision: str, kernel: str = "fused") -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")


# ======================================================================= activation model


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes kept for backward per token: the residual-stream part (memory_report's 'residual'),
    the layers' own part (attention, FFN, experts) and the rest (embedding ids, head, loss)."""

    residual: float
    layer: float
    other: float

    @property
    def total(self) -> float:
        return self.residual + self.layer + self.other

    def __add__(self, o: "ActivationBytes") -> "ActivationBytes":
        return ActivationBytes(self.residual + o.residual, self.layer + o.layer, self.other + o.other)


def _y_bytes(kind: str, precision: str) -> int:
    """Bytes per element of a sublayer output: the MoE combines in the input's dtype (fp32)."""
    return 4 if precision == "fp32" or kind == "moe" else 2


def residual_bytes(m: ModelConfig, r: ResidualConfig, kind: str, precision: str = "bf16") -> float:
    """Residual part of one sublayer without recomputation, per token (module docstring)."""
    _check(precision)
    c, n = m.dim, r.streams
    a = 4 * c if precision == "fp32" else 0  # F's saved input; under autocast F keeps bf16 casts
    y = _y_bytes(kind, precision) * c
    prenorm = 8 * c + 4  # u (fp32), rsqrt, normalised
    if r.variant == "baseline":
        return 4 * c + 4 + 4 * c + a  # the stream (a view of the streams), rsqrt, normalised
    if r.variant == "mhc":
        w = n * n + 2 * n
        return 4 * n * c + 8 * w + 4 + 8 * n + prenorm + a + y
    if r.variant == "hc":
        kept = 4 * n * c  # the streams (apply_pre, apply_post_res)
        if r.dynamic:
            t = 4 if precision == "fp32" else 2  # tanh of a bf16 matmul under autocast
            normed = 4 * n * c  # the norm's output in fp32, or its two bf16 casts (alpha and beta maps)
            kept += 4 * n + 4 * n * c + normed + t * (n * (n + 1) + n) + 4 * n * (n + 1) + 4 * n
        return kept + prenorm + a + y
    raise ValueError(f"unknown residual variant {r.variant!r}")


def recompute_kept_bytes(m: ModelConfig, r: ResidualConfig, kind: str, precision: str = "bf16") -> float:
    """Per sublayer under recomputation, besides 4nC per block: the sublayer output y (hc, mhc)."""
    return 0.0 if r.variant == "baseline" else float(_y_bytes(kind, precision) * m.dim)


def attention_bytes(m: ModelConfig, seq_len: int, precision: str = "bf16", kernel: str = "fused") -> float:
    """MLA's own saved tensors per token (module docstring); the normed input is residual's."""
    _check(precision, kernel)
    c, h, kv, rope = m.dim, m.n_heads, m.kv_lora_rank, m.qk_rope_head_dim
    dqk, dn, dv = m.qk_head_dim, m.qk_nope_head_dim, m.v_head_dim
    e = 4 if precision == "fp32" else 2
    if precision == "fp32":
        own = 4 * (kv + rope) + 4 + 8 * kv + 4 * h * dv  # kv_norm's input (a view of wkv_a's output), ...
        if m.q_lora_rank:
            own += 4 * m.q_lora_rank + 4 + 8 * m.q_lora_rank
    else:
        own = 4 * c + 4 * kv + 4 + 4 * kv + 2 * h * dv  # two casts of a, kv_norm fp32 copy, ...
        if m.q_lora_rank:
            own += 4 * m.q_lora_rank + 4 + 4 * m.q_lora_rank
    if kernel == "math":  # CPU: computed in fp32 (autocast inputs upcast), probabilities S per token
        sdpa = 4 * (2 * h * dqk + h * seq_len + h * dv)
    else:  # q, k (concatenated), v (a view of the kv projection), output, logsumexp
        sdpa = e * (2 * h * dqk + h * (dn + dv) + h * dv) + 4 * h
    return float(own + sdpa)


def ffn_bytes(m: ModelConfig, kind: str, precision: str = "bf16") -> float:
    """Dense SwiGLU or MoE saved tensors per token (module docstring)."""
    _check(precision)
    c = m.dim
    if kind == "dense":
        f = m.ffn_dim_dense
        return float(16 * f if precision == "fp32" else 4 * c + 8 * f)
    k, e, fe, fs = m.n_activated_experts, m.n_routed_experts, m.moe_ffn_dim, m.n_shared_experts * m.moe_ffn_dim
    if precision == "fp32":
        return float(4 * e + 32 * k + 4 + 12 * k * c + 16 * k * fe + 16 * fs)
    shared_casts = 4 * c if fs else 0
    return float(2 * c + 2 * e + 28 * k + 2 + 8 * k * c + 8 * k * fe + 8 * fs + shared_casts)


def head_bytes(m: ModelConfig, r: ResidualConfig, precision: str = "bf16") -> float:
    """Contraction, final norm, head and loss (last stage) per token."""
    _check(precision)
    c, v = m.dim, m.vocab_size
    out = (12 * c if precision == "fp32" else 10 * c) + 4 * v + 12
    if r.contraction == "learned":
        out += 4 * r.streams * c
    return float(out)


EMBED_BYTES = 8.0  # the token ids the embedding keeps (int64)


def recompute_block(m: ModelConfig, r: ResidualConfig, recompute) -> int | None:
    """L_r in sublayers: None (off), Eq 20's L_r* of the whole model (True / 'auto'), or given."""
    if recompute in (None, False, "off"):
        return None
    if recompute in (True, "auto"):
        return optimal_block_size(r.streams, m.n_sublayers)
    return int(recompute)


def stage_activation_bytes(m: ModelConfig, r: ResidualConfig, blocks: range, seq_len: int, *,
                           precision: str = "bf16", kernel: str = "fused", recompute=None,
                           first: bool = True, last: bool = True, keeps_output: bool = False) -> ActivationBytes:
    """Bytes per token one micro-batch keeps for backward on a stage holding ``blocks``.

    ``recompute``: None / False (off), True / 'auto' (Eq 20) or L_r; recompute blocks restart at
    the stage's first sublayer. ``keeps_output``: a pipeline stage that is not the last keeps its
    output [b, S, n, C] until its backward."""
    _check(precision, kernel)
    lr = recompute_block(m, r, recompute)
    residual = layer = 0.0
    kinds = []
    for i in blocks:
        kinds += ["attn", "moe" if i >= m.n_dense_layers else "dense"]
    for kind in kinds:
        ffn_kind = "dense" if kind == "attn" else kind  # an attention output is bf16 like a dense one
        if lr is None:
            residual += residual_bytes(m, r, ffn_kind, precision)
        else:
            residual += recompute_kept_bytes(m, r, ffn_kind, precision)
        layer += attention_bytes(m, seq_len, precision, kernel) if kind == "attn" else ffn_bytes(m, kind, precision)
    if lr is not None and kinds:
        residual += 4 * r.streams * m.dim * math.ceil(len(kinds) / lr)
    other = (EMBED_BYTES if first else 0.0) + (head_bytes(m, r, precision) if last else 0.0)
    if keeps_output and not last:
        other += 4 * r.streams * m.dim
    return ActivationBytes(residual, layer, other)


def model_activation_bytes(m: ModelConfig, r: ResidualConfig, seq_len: int, *, precision: str = "bf16",
                           kernel: str = "fused", recompute=None) -> ActivationBytes:
    """The whole model in one process: ``stage_activation_bytes`` of every block."""
    return stage_activation_bytes(m, r, range(m.n_layers), seq_len, precision=precision, kernel=kernel,
                                  recompute=recompute)


def recompute_transient_bytes(m: ModelConfig, r: ResidualConfig, precision: str = "bf16", recompute=None) -> float:
    """Per token: one recompute block's residual-stream tensors, alive again during its backward."""
    lr = recompute_block(m, r, recompute)
    if lr is None:
        return 0.0
    return lr * max(residual_bytes(m, r, kind, precision) for kind in ("dense", "moe"))


def logits_transient_bytes(m: ModelConfig) -> float:
    """Per token on the last stage, beyond the saved log-softmax: the logits (bf16) and their
    gradient (fp32, then its bf16 cast for the head's backward): 8 V."""
    return 8.0 * m.vocab_size


def measure_activation_bytes(m: ModelConfig, r: ResidualConfig, seq_len: int, *, precision: str = "fp32",
                             batches: tuple[int, int] = (2, 4), seed: int = 0) -> ActivationBytes:
    """Bytes per token kept for backward by a real training forward on the CPU, measured with
    ``mhc_train.bench.memory_report.measure`` (saved-tensor hooks, storages counted once) at two
    batch sizes: the difference per token leaves out what does not grow with the batch (weights'
    bf16 casts under autocast, the RoPE tables). ``precision="bf16"`` runs under CPU autocast."""
    import torch

    from mhc_train.bench.memory_report import measure
    from mhc_train.model.transformer import MHCTransformer

    _check(precision)
    with torch.device("meta"):
        model = MHCTransformer(m, r)
    model = model.to_empty(device="cpu").train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # sizes do not depend on the values: a plain draw, no model init needed
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for b in model.buffers():
            b.zero_()
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is as fast and does not stall on a busy machine
    try:
        for batch in batches:
            tokens = torch.randint(0, m.vocab_size, (batch, seq_len + 1), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                results.append(measure(model, tokens))
    finally:
        torch.set_num_threads(threads)
    tokens = (batches[1] - batches[0]) * seq_len
    per = {k: (results[1][k] - results[0][k]) / tokens for k in results[0]}
    return ActivationBytes(per["residual"], per["layer"], per["other"])


# ======================================================================= parameters and stages


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by where they live: per block (non-expert, routed experts over all E), the
    first stage's root (embedding) and the last stage's root (contraction, final norm, head)."""

    blocks: tuple[tuple[int, int], ...]
    first: int
    last: int

    @property
    def total(self) -> int:
        return self.first + self.last + sum(a + b for a, b in self.blocks)


def parameter_counts(model) -> ParamCounts:
    """From a (meta) model, with ``summary.classify_parameters``'s components."""
    from mhc_train.model.summary import classify_parameters

    components = classify_parameters(model)
    sizes = dict(model.named_parameters())
    blocks = [[0, 0] for _ in model.blocks]
    first = last = 0
    for name, component in components.items():
        numel = sizes[name].numel()
        if name.startswith("blocks."):
            blocks[int(name.split(".")[1])][component == "routed_experts"] += numel
        elif name.startswith("embed."):
            first += numel
        else:
            last += numel
    return ParamCounts(tuple((a, b) for a, b in blocks), first, last)


@dataclass(frozen=True)
class RankStage:
    blocks: range
    first: bool  # holds the embedding
    last: bool  # holds the head


@dataclass
class PlanContext:
    """What every layout of one model shares: configs, parameter counts, cuts and simulations."""

    model_cfg: ModelConfig
    residual_cfg: ResidualConfig
    seq_len: int
    global_batch: int
    precision: str = "bf16"
    kernel: str = "fused"  # the GPU's SDPA; "math" is what a CPU runs for MLA (calibration only)
    model: object = None  # meta model (built on demand)
    params: ParamCounts | None = None
    _cuts: dict = field(default_factory=dict)
    _params: dict = field(default_factory=dict)
    _comms: dict = field(default_factory=dict)
    _acts: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.precision, self.kernel)
        if self.model is None:
            from mhc_train.model.summary import build_meta_model

            self.model = build_meta_model(self.model_cfg, self.residual_cfg)
        if self.params is None:
            self.params = parameter_counts(self.model)

    def rank_stages(self, pp: int, schedule: str | None) -> list[list[RankStage]]:
        """Per pipeline rank, its stages (blocks balanced by ``pipeline.plan_stage_blocks``)."""
        key = (pp, schedule)
        if key not in self._cuts:
            n_layers = self.model_cfg.n_layers
            if pp == 1:
                self._cuts[key] = [[RankStage(range(n_layers), True, True)]]
            else:
                from mhc_train.parallel.pipeline import (
                    plan_stage_blocks,
                    resolve_stages_per_rank,
                    stage_block_ranges,
                    stage_to_rank,
                )

                spr = resolve_stages_per_rank(schedule, None)
                stages = pp * spr
                ranges = stage_block_ranges(plan_stage_blocks(self.model, stages, seq_len=self.seq_len))
                out: list[list[RankStage]] = [[] for _ in range(pp)]
                for s, rank in sorted(stage_to_rank(schedule, pp, spr).items()):
                    out[rank].append(RankStage(ranges[s], s == 0, s == stages - 1))
                self._cuts[key] = out
        return self._cuts[key]

    def rank_activation_bytes(self, stages: list[RankStage], recompute, pipelined: bool) -> ActivationBytes:
        """Per token of one micro-batch, what a pipeline rank's stages keep for backward."""
        key = (tuple((s.blocks, s.first, s.last) for s in stages), recompute, pipelined)
        if key not in self._acts:
            act = ActivationBytes(0.0, 0.0, 0.0)
            for s in stages:
                act = act + stage_activation_bytes(self.model_cfg, self.residual_cfg, s.blocks, self.seq_len,
                                                   precision=self.precision, kernel=self.kernel,
                                                   recompute=recompute, first=s.first, last=s.last,
                                                   keeps_output=pipelined)
            self._acts[key] = act
        return self._acts[key]

    def simulation(self, schedule: str, pp: int, microbatches: int):
        """(bubble fraction, peak stage-micro-batches per rank) from the schedule simulator, with
        a rank's F : B : W = 1 : 2 : 1, F&B pairs overlapped, no communication."""
        return _simulate(schedule, pp, microbatches)

    def rank_params(self, pp: int, schedule: str | None, ep: int) -> list[tuple[float, float]]:
        """Per pipeline rank: (non-expert parameters, its E / ep routed experts' parameters)."""
        key = (pp, schedule, ep)
        if key not in self._params:
            self._params[key] = [_rank_params(self, stages, ep) for stages in self.rank_stages(pp, schedule)]
        return self._params[key]


@lru_cache(maxsize=None)
def _simulate(schedule: str, pp: int, microbatches: int) -> tuple[float, tuple[int, ...]]:
    from mhc_train.parallel.simulator import Times, evaluate

    res = evaluate(schedule, pp, microbatches, Times(F=1.0, B=2.0, W=1.0), overlap="on", per="rank")
    return res.bubble_fraction, tuple(res.peak_memory)


# ======================================================================= layouts


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpu_mem_gb: float = 80.0  # GiB
    gpus_per_node: int = 8
    intra_gbps: float = 450.0  # GB/s per GPU inside a node (NVLink)
    inter_gbps: float = 50.0  # GB/s per GPU between nodes (a 400 Gb/s NIC per GPU)
    headroom: float = 0.10  # kept free for the CUDA context, NCCL buffers and allocator fragmentation
    tflops: float = 400.0  # achieved bf16 TFLOP/s per GPU, for the step-time estimate only
    max_bubble: float = 0.20  # a pipeline counts as busy when its bubble is at most this

    def validate(self) -> None:
        def bad(key, reason):
            raise ValueError(f"cluster.{key}: {reason}")

        if not isinstance(self.gpus, int) or isinstance(self.gpus, bool) or self.gpus < 1:
            bad("gpus", f"must be an integer >= 1, got {self.gpus!r}")
        if not isinstance(self.gpus_per_node, int) or isinstance(self.gpus_per_node, bool) or self.gpus_per_node < 1:
            bad("gpus_per_node", f"must be an integer >= 1, got {self.gpus_per_node!r}")
        for key in ("gpu_mem_gb", "intra_gbps", "inter_gbps", "tflops"):
            if not getattr(self, key) > 0:
                bad(key, f"must be > 0, got {getattr(self, key)!r}")
        if not 0 <= self.headroom < 1:
            bad("headroom", f"must be in [0, 1), got {self.headroom!r}")
        if not 0 <= self.max_bubble < 1:
            bad("max_bubble", f"must be in [0, 1), got {self.max_bubble!r}")

    @property
    def usable_bytes(self) -> float:
        return self.gpu_mem_gb * GIB * (1 - self.headroom)


@dataclass(frozen=True)
class Layout:
    degrees: MeshDegrees
    schedule: str | None  # None: no pipeline (pp = 1, micro-batches accumulate)
    micro_batch: int  # sequences per micro-batch
    microbatches: int  # per step and data rank
    recompute: bool
    reshard: bool | None  # FSDP2 reshard_after_forward; None where nothing is FSDP-sharded


def _divisors(x: int) -> list[int]:
    return [d for d in range(1, x + 1) if x % d == 0]


def _fsdp_groups(shard: int, replicate: int) -> tuple[int, int]:
    """(ranks that shard, ranks that hold copies of each shard) of one parameter class, as
    ``ParallelMesh.data_mesh`` / ``expert_data_mesh`` build them: HSDP over (replicate, shard)
    whenever replicate > 1 (a shard size of 1 is plain replication), else FSDP over shard."""
    return shard, replicate


def enumerate_layouts(ctx: PlanContext, cluster: Cluster, schedules=PLAN_SCHEDULES) -> list[Layout]:
    """Every layout the mesh can build on ``cluster.gpus``: degrees that pass ``resolve_degrees``,
    pipelines that pass ``validate_pipeline`` for each schedule, micro-batches of 1, 2, 4, ...
    sequences that split the global batch evenly over the data ranks, recomputation off / on and,
    where FSDP shards, reshard_after_forward on / off."""
    from mhc_train.parallel.pipeline import V_SCHEDULES, PipelineConfigError, validate_pipeline

    m = ctx.model_cfg
    has_moe = m.n_layers > m.n_dense_layers
    out: list[Layout] = []
    for pp in _divisors(cluster.gpus):
        rest = cluster.gpus // pp
        for dp_replicate in _divisors(rest):
            dp_shard = rest // dp_replicate
            for ep in _divisors(dp_shard):
                try:
                    d = resolve_degrees(cluster.gpus, pp, dp_replicate, dp_shard, ep,
                                        n_routed_experts=m.n_routed_experts, has_moe=has_moe)
                except MeshConfigError:
                    continue
                shards = d.dp > 1
                reshards = (True, False) if shards else (None,)
                mb = 1
                while ctx.global_batch % (d.dp * mb) == 0:
                    micro = ctx.global_batch // (d.dp * mb)
                    for schedule in (schedules if pp > 1 else (None,)):
                        if schedule is not None:
                            try:
                                validate_pipeline(schedule, pp, m.n_layers, micro, batch_size=mb * micro)
                            except PipelineConfigError:
                                continue
                        # the split-backward schedules need the gathered weights kept (config.py refuses true)
                        allowed = (False,) if schedule in V_SCHEDULES and shards else reshards
                        for recompute in (False, True):
                            for reshard in allowed:
                                out.append(Layout(d, schedule, mb, micro, recompute, reshard))
                    mb *= 2
    return out


# ======================================================================= one layout's estimate


@dataclass
class Estimate:
    layout: Layout
    bytes_per_gpu: dict[str, float]  # MEMORY_PARTS + total, of the worst pipeline rank
    worst_rank: int  # the pipeline rank that needs the most memory
    fits: bool
    comm: dict[str, float]  # bytes per GPU per step by kind, intra / inter node, seconds
    bubble: float
    busy: bool  # the pipeline's bubble is at most cluster.max_bubble (always, without a pipeline)
    compute_s: float  # step compute at cluster.tflops, bubble included
    step_s: float  # compute_s + comm seconds (no overlap)

    def to_json(self) -> dict:
        lay = self.layout
        d = lay.degrees
        return {
            "degrees": {"pp": d.pp, "dp_replicate": d.dp_replicate, "dp_shard": d.dp_shard, "ep": d.ep},
            "schedule": lay.schedule, "micro_batch": lay.micro_batch, "microbatches": lay.microbatches,
            "recompute": lay.recompute, "reshard_after_forward": lay.reshard,
            "bytes_per_gpu": {k: int(round(v)) for k, v in self.bytes_per_gpu.items()},
            "worst_rank": self.worst_rank, "fits": self.fits,
            "comm": {k: (round(v, 4) if k.endswith("_s") else int(round(v))) for k, v in self.comm.items()},
            "bubble": round(self.bubble, 4), "busy": self.busy,
            "compute_s": round(self.compute_s, 3), "step_s": round(self.step_s, 3),
        }


def _coords(rank: int, d: MeshDegrees) -> tuple[int, int, int, int]:
    """(pp, dp_replicate, dp_shard_mod_ep, ep) of a global rank: the mesh's row-major order."""
    e = rank % d.ep
    s = (rank // d.ep) % d.dp_shard_mod_ep
    r = (rank // (d.ep * d.dp_shard_mod_ep)) % d.dp_replicate
    p = rank // (d.ep * d.dp_shard_mod_ep * d.dp_replicate)
    return p, r, s, e


def _rank_of(p: int, r: int, s: int, e: int, d: MeshDegrees) -> int:
    return ((p * d.dp_replicate + r) * d.dp_shard_mod_ep + s) * d.ep + e


def _group(rank: int, d: MeshDegrees, dims: tuple[str, ...]) -> list[int]:
    """The ranks that differ from ``rank`` only along ``dims`` (names of MESH_DIMS)."""
    base = dict(zip(("pp", "dp_replicate", "dp_shard_mod_ep", "ep"), _coords(rank, d)))
    sizes = {"pp": d.pp, "dp_replicate": d.dp_replicate, "dp_shard_mod_ep": d.dp_shard_mod_ep, "ep": d.ep}
    members = [base]
    for dim in dims:
        members = [{**c, dim: i} for c in members for i in range(sizes[dim])]
    return [_rank_of(c["pp"], c["dp_replicate"], c["dp_shard_mod_ep"], c["ep"], d) for c in members]


def _shard_dims(shard_dims: tuple[str, ...], shard: int, replicate: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Mesh dims of the shard group and of the replicate group (``_fsdp_groups``'s rule)."""
    return (shard_dims if shard > 1 else ()), (("dp_replicate",) if replicate > 1 else ())


def estimate(ctx: PlanContext, cluster: Cluster, lay: Layout) -> Estimate:
    """Bytes per GPU (worst pipeline rank) and communication per GPU per step of one layout."""
    m, r = ctx.model_cfg, ctx.residual_cfg
    d = lay.degrees
    prec = ctx.precision
    pe = 2 if prec == "bf16" else 4  # compute copies of the weights
    tokens_mb = lay.micro_batch * ctx.seq_len
    m_count = lay.microbatches
    recompute = "auto" if lay.recompute else None

    ne_shard, ne_rep = _fsdp_groups(d.dp_shard, d.dp_replicate)
    ex_shard, ex_rep = _fsdp_groups(d.dp_shard_mod_ep, d.dp_replicate)
    stages_of = ctx.rank_stages(d.pp, lay.schedule)
    if d.pp > 1:
        bubble, peaks = ctx.simulation(lay.schedule, d.pp, m_count)
    else:
        bubble, peaks = 0.0, [1]
    moe_layers = [i for i in range(m.n_layers) if i >= m.n_dense_layers]
    k, c = m.n_activated_experts, m.dim
    disp_b = 4  # the normed sublayer input is fp32 under autocast too
    comb_b = 2 if prec == "bf16" else 4

    worst = None
    rank_bytes = []
    for pr, stages in enumerate(stages_of):
        ne, ex = ctx.rank_params(d.pp, lay.schedule, d.ep)[pr]  # ex: this rank's E / ep experts
        sharded = ne / ne_shard + ex / ex_shard
        parts = dict.fromkeys(MEMORY_PARTS, 0.0)
        parts["params"] = 4 * sharded
        parts["grads"] = 4 * sharded
        parts["optimizer"] = 8 * sharded
        # unsharded compute copies
        block_sizes = [ctx.params.blocks[i][0] * (ne_shard > 1) + ctx.params.blocks[i][1] / d.ep * (ex_shard > 1)
                       for s in stages for i in s.blocks]
        root = sum(ctx.params.first for s in stages if s.first) + sum(ctx.params.last for s in stages if s.last)
        ne_fsdp = ne if ne_shard > 1 else 0.0
        ex_fsdp = ex if ex_shard > 1 else 0.0
        if d.pp > 1 or not lay.reshard:
            gathered = ne_fsdp + ex_fsdp  # the whole rank stays gathered between forward and backward
        else:
            gathered = 2 * max(block_sizes, default=0.0) + (root if ne_shard > 1 else 0.0)
        unsharded = pe * gathered
        if prec == "bf16" and ne_shard > 1:  # FSDP gathers the embedding in fp32 (streams stay fp32)
            unsharded += 2 * sum(ctx.params.first for s in stages if s.first)
        if prec == "bf16":
            if ne_shard == 1:
                unsharded += 2 * ne  # autocast's cached bf16 casts, one per step
            if ex_shard == 1:  # the experts' explicit casts, one per micro-batch in flight
                unsharded += 2 * ex * max(peaks[pr] if d.pp > 1 else 1, 1) / max(len(stages), 1)
        if m_count > 1:  # FSDP2 accumulates unsharded fp32 gradients until the step's reduce-scatter
            parts["grad_accumulation"] = 4 * (ne_fsdp + ex_fsdp)
        elif ne_shard > 1 or ex_shard > 1:
            unsharded += 4 * max(block_sizes, default=0.0)  # one block's gradient before its reduce-scatter
        parts["params_unsharded"] = unsharded
        # activations
        one_mb = ctx.rank_activation_bytes(stages, recompute, d.pp > 1).total * tokens_mb
        in_flight_units = peaks[pr] if d.pp > 1 else 1
        parts["activations"] = one_mb
        parts["activations_in_flight"] = max(0.0, in_flight_units * one_mb / len(stages) - one_mb)
        rank_moe = [i for s in stages for i in s.blocks if i in moe_layers]
        if d.ep > 1 and rank_moe:
            overlapped = 2 if lay.schedule == "dualpipev" else 1
            parts["all_to_all"] = tokens_mb * k * c * (2 * disp_b + 2 * comb_b) * overlapped
        transients = [recompute_transient_bytes(m, r, prec, recompute) * tokens_mb]
        if any(s.last for s in stages):
            transients.append(logits_transient_bytes(m) * tokens_mb)
        parts["transient"] = max(transients)
        parts["total"] = sum(parts[p] for p in MEMORY_PARTS)
        rank_bytes.append(parts)
        if worst is None or parts["total"] > rank_bytes[worst]["total"]:
            worst = pr

    comm = _communication(ctx, cluster, lay, stages_of, moe_layers, disp_b, comb_b, pe)
    fwd_flops = _forward_flops_per_token(ctx)
    recompute_extra = _connection_flops(ctx) if lay.recompute else 0.0
    tokens_step = ctx.global_batch * ctx.seq_len
    compute = (3 * fwd_flops + recompute_extra) * tokens_step / (cluster.gpus * cluster.tflops * 1e12)
    compute /= (1 - bubble)
    busy = d.pp == 1 or bubble <= cluster.max_bubble
    parts = rank_bytes[worst]
    return Estimate(lay, parts, worst, parts["total"] <= cluster.usable_bytes, comm, bubble, busy,
                    compute, compute + comm["time_s"])


def _forward_flops_per_token(ctx: PlanContext) -> float:
    if not hasattr(ctx, "_fwd_flops"):
        from mhc_train.model.summary import flops_per_token

        ctx._fwd_flops = flops_per_token(ctx.model_cfg, ctx.residual_cfg, ctx.seq_len, model=ctx.model).forward
    return ctx._fwd_flops


def _connection_flops(ctx: PlanContext) -> float:
    from mhc_train.model.summary import connection_flops_per_token

    return connection_flops_per_token(ctx.model_cfg, ctx.residual_cfg)


def _rank_params(ctx: PlanContext, stages: list[RankStage], ep: int) -> tuple[float, float]:
    """(non-expert parameters, this rank's routed-expert parameters) of one pipeline rank."""
    ne = sum(ctx.params.blocks[i][0] for s in stages for i in s.blocks)
    ne += sum(ctx.params.first for s in stages if s.first) + sum(ctx.params.last for s in stages if s.last)
    ex = sum(ctx.params.blocks[i][1] for s in stages for i in s.blocks) / ep
    return ne, ex


@lru_cache(maxsize=None)
def _topology(d: MeshDegrees, gpus_per_node: int, schedule: str | None) -> tuple:
    """Per global rank: (pp coordinate, whether each collective group spans nodes: non-expert
    shard, non-expert replicate, expert shard, expert replicate; ep peers on other nodes, ep peers
    on this node; per pipeline message, whether its peer is on another node)."""
    node = lambda g: g // gpus_per_node  # noqa: E731
    ne_dims = _shard_dims(("dp_shard_mod_ep", "ep"), d.dp_shard, d.dp_replicate)
    ex_dims = _shard_dims(("dp_shard_mod_ep",), d.dp_shard_mod_ep, d.dp_replicate)
    out = []
    for rank in range(d.world):
        c = _coords(rank, d)
        spans = [len({node(g) for g in _group(rank, d, dims)}) > 1 if dims else False
                 for dims in (*ne_dims, *ex_dims)]  # ne shard, ne replicate, ex shard, ex replicate
        peers = [g for g in _group(rank, d, ("ep",)) if g != rank]
        ep_far = sum(node(g) != node(rank) for g in peers)
        pp_far = tuple(node(_rank_of(q, c[1], c[2], c[3], d)) != node(rank)
                       for q in (_pp_sends(c[0], d.pp, schedule) if d.pp > 1 else ()))
        out.append((c[0], *spans, ep_far, len(peers) - ep_far, pp_far))
    return tuple(out)


def _communication(ctx: PlanContext, cluster: Cluster, lay: Layout, stages_of, moe_layers, disp_b: int,
                   comb_b: int, pe: int) -> dict[str, float]:
    """Bytes per GPU per step by kind and node locality, of the rank whose communication takes
    longest."""
    m, d = ctx.model_cfg, lay.degrees
    key = (d, lay.schedule, lay.micro_batch, lay.microbatches, lay.reshard, cluster)
    if key in ctx._comms:
        return ctx._comms[key]
    m_count, tokens_mb = lay.microbatches, lay.micro_batch * ctx.seq_len
    ne_shard, ne_rep = _fsdp_groups(d.dp_shard, d.dp_replicate)
    ex_shard, ex_rep = _fsdp_groups(d.dp_shard_mod_ep, d.dp_replicate)
    gathers = (m_count * 2 if lay.reshard else 1) if d.pp > 1 else m_count * (2 if lay.reshard else 1)
    message = tokens_mb * ctx.residual_cfg.streams * m.dim * 4  # [b, S, n, C] fp32, per micro-batch
    rank_params = ctx.rank_params(d.pp, lay.schedule, d.ep)
    n_moe_of = [sum(1 for s in stages for i in s.blocks if i in moe_layers) for stages in stages_of]
    best = None
    for p, *spans, ep_far, ep_near, pp_far in _topology(d, cluster.gpus_per_node, lay.schedule):
        ne, ex = rank_params[p]
        kinds = dict.fromkeys(("fsdp_allgather", "fsdp_reduce_scatter", "hsdp_allreduce", "ep_all_to_all",
                               "pp_p2p"), 0.0)
        where = {"intra": 0.0, "inter": 0.0}

        def add(kind, nbytes, far):
            kinds[kind] += nbytes
            where["inter" if far else "intra"] += nbytes

        shard_far = {"ne": spans[0], "ex": spans[2]}
        rep_far = {"ne": spans[1], "ex": spans[3]}
        for cls, count, shard, rep in (("ne", ne, ne_shard, ne_rep), ("ex", ex, ex_shard, ex_rep)):
            if shard > 1:
                add("fsdp_allgather", gathers * pe * count * (shard - 1) / shard, shard_far[cls])
                add("fsdp_reduce_scatter", 4 * count * (shard - 1) / shard, shard_far[cls])
            if rep > 1:
                add("hsdp_allreduce", 2 * 4 * count / shard * (rep - 1) / rep, rep_far[cls])
        n_moe = n_moe_of[p]
        if d.ep > 1 and n_moe:
            per_peer = m_count * n_moe * tokens_mb * m.n_activated_experts * m.dim * 2 * (disp_b + comb_b) / d.ep
            add("ep_all_to_all", per_peer * ep_far, True)
            add("ep_all_to_all", per_peer * ep_near, False)
        for far in pp_far:
            add("pp_p2p", m_count * message, far)
        intra, inter = where["intra"], where["inter"]
        time = intra / (cluster.intra_gbps * GB) + inter / (cluster.inter_gbps * GB)
        if best is None or time > best["time_s"]:
            best = {**kinds, "intra_node": intra, "inter_node": inter, "total": intra + inter, "time_s": time}
    ctx._comms[key] = best
    return best


def _pp_sends(p: int, pp: int, schedule: str) -> list[int]:
    """Pipeline ranks this rank sends to once per micro-batch (activations forward, gradients
    backward), one entry per message."""
    from mhc_train.parallel.pipeline import resolve_stages_per_rank, stage_to_rank

    spr = resolve_stages_per_rank(schedule, None)
    mapping = stage_to_rank(schedule, pp, spr)
    stages = pp * spr
    out = []
    for s, rank in mapping.items():
        if rank != p:
            continue
        if s + 1 < stages and mapping[s + 1] != p:
            out.append(mapping[s + 1])
        if s > 0 and mapping[s - 1] != p:
            out.append(mapping[s - 1])
    return out


# ======================================================================= the plan


@dataclass
class Plan:
    model_name: str
    cluster: Cluster
    seq_len: int
    global_batch: int
    estimates: list[Estimate]  # fitting ones ranked first, then the rest by how far they miss
    recommended: Estimate | None
    parameters: int = 0  # of the whole model

    @property
    def fitting(self) -> list[Estimate]:
        return [e for e in self.estimates if e.fits]

    @property
    def misses(self) -> list[Estimate]:
        return [e for e in self.estimates if not e.fits]


def rank_key(e: Estimate):
    """Least communication time first; then less bubble, recomputation off, fewer bytes."""
    return (round(e.comm["time_s"], 9), round(e.bubble, 9), e.layout.recompute, e.bytes_per_gpu["total"])


def plan(model_cfg: ModelConfig, residual_cfg: ResidualConfig, cluster: Cluster, seq_len: int,
         global_batch: int, *, model_name: str = "custom", precision: str = "bf16",
         schedules=PLAN_SCHEDULES) -> Plan:
    """Every layout estimated: those that fit ranked by ``rank_key``, then the misses by total
    bytes; the recommendation is the best-ranked layout that fits with a busy pipeline."""
    cluster.validate()
    if not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"train.global_batch: must be an integer >= 1, got {global_batch!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"train.seq_len: must be an integer >= 1, got {seq_len!r}")
    ctx = PlanContext(model_cfg, residual_cfg, seq_len, global_batch, precision=precision)
    estimates = [estimate(ctx, cluster, lay) for lay in enumerate_layouts(ctx, cluster, schedules)]
    fitting = sorted((e for e in estimates if e.fits), key=rank_key)
    misses = sorted((e for e in estimates if not e.fits), key=lambda e: e.bytes_per_gpu["total"])
    recommended = next((e for e in fitting if e.busy), None)
    return Plan(model_name, cluster, seq_len, global_batch, fitting + misses, recommended, ctx.params.total)


__all__ = [
    "ATTENTION_KERNELS", "ActivationBytes", "Cluster", "EMBED_BYTES", "GB", "GIB", "Estimate", "Layout", "MEMORY_PARTS",
    "PAPER_GLOBAL_BATCH", "PLAN_SCHEDULES", "PRECISIONS", "ParamCounts", "Plan", "PlanContext", "RankStage",
    "attention_bytes", "enumerate_layouts", "estimate", "ffn_bytes", "head_bytes", "logits_transient_bytes",
    "measure_activation_bytes", "model_activation_bytes", "parameter_counts", "plan", "rank_key",
    "recompute_block", "recompute_kept_bytes", "recompute_transient_bytes", "residual_bytes",
    "stage_activation_bytes",
]
