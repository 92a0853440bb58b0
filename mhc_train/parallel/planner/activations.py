"""The activation model: bytes per token one micro-batch keeps for backward, per sublayer and per
stage (the package docstring has the formulas), and its CPU measurement (``measure_activation_bytes``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mhc_train.model.config import ModelConfig
from mhc_train.residual.config import ResidualConfig
from mhc_train.residual.recompute import optimal_block_size

PRECISIONS = ("bf16", "fp32")
ATTENTION_KERNELS = ("fused", "math")


def _check(precision: str, kernel: str = "fused") -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")


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


def _y_bytes(kind: str, precision: str, input_bytes: int) -> int:
    """Bytes per element of a sublayer output: bf16 under autocast, but the MoE combines in its
    input's dtype (the streams')."""
    return 4 if precision == "fp32" else input_bytes if kind == "moe" else 2


def stream_bytes(r: ResidualConfig, precision: str) -> int:
    """Bytes per element of the residual streams (``residual.stream_dtype``; auto: bf16 in a bf16 run)."""
    if r.stream_dtype == "auto":
        return 2 if precision == "bf16" else 4
    return 4 if r.stream_dtype == "float32" else 2


def residual_bytes(m: ModelConfig, r: ResidualConfig, kind: str, precision: str = "bf16") -> float:
    """Residual part of one sublayer without recomputation, per token (module docstring)."""
    _check(precision)
    c, n, s = m.dim, r.streams, stream_bytes(r, precision)
    # F's saved input: the norm's output, in the streams' dtype; fp32 ones under autocast are
    # cast by F, whose bf16 copies count in its own part
    a = s * c if precision == "fp32" or s == 2 else 0
    y = _y_bytes(kind, precision, s) * c
    prenorm = s * c + 4 * c + 4  # u (the streams' dtype), rsqrt, normalised
    if r.variant == "baseline":
        return s * c + 4 + 4 * c + a  # the stream (a view of the streams), rsqrt, normalised
    if r.variant == "mhc":
        w = n * n + 2 * n
        return s * n * c + 4 * w + 4 + 8 * n + prenorm + a + y
    if r.variant == "hc":
        kept = s * n * c  # the streams (apply_pre, apply_post_res)
        if r.dynamic:
            t = 4 if precision == "fp32" else 2  # tanh of a bf16 matmul under autocast
            upcast = 4 * n * c if s == 2 else 0  # the per-stream norm's fp32 copy of bf16 streams
            normed = 4 * n * c  # the norm's output in fp32, or its two bf16 casts (alpha and beta maps)
            kept += upcast + 4 * n + 4 * n * c + normed + t * (n * (n + 1) + n) + 4 * n * (n + 1) + 4 * n
        return kept + prenorm + a + y
    raise ValueError(f"unknown residual variant {r.variant!r}")


def recompute_kept_bytes(m: ModelConfig, r: ResidualConfig, kind: str, precision: str = "bf16") -> float:
    """Per sublayer under recomputation, besides 4nC per block: the sublayer output y (hc, mhc)."""
    y = _y_bytes(kind, precision, stream_bytes(r, precision))
    return 0.0 if r.variant == "baseline" else float(y * m.dim)


def attention_bytes(m: ModelConfig, seq_len: int, precision: str = "bf16", kernel: str = "fused",
                    input_bytes: int = 2) -> float:
    """MLA's own saved tensors per token (module docstring); the normed input is residual's.
    ``input_bytes``: of an element of that input (the streams'); an fp32 input under autocast is
    cast to bf16 by each of its two projections, which keep the copies."""
    _check(precision, kernel)
    c, h, kv, rope = m.dim, m.n_heads, m.kv_lora_rank, m.qk_rope_head_dim
    dqk, dn, dv = m.qk_head_dim, m.qk_nope_head_dim, m.v_head_dim
    e = 4 if precision == "fp32" else 2
    if precision == "fp32":
        own = 4 * (kv + rope) + 4 + 8 * kv + 4 * h * dv  # kv_norm's input (a view of wkv_a's output), ...
        if m.q_lora_rank:
            own += 4 * m.q_lora_rank + 4 + 8 * m.q_lora_rank
    else:
        own = 4 * kv + 4 + 4 * kv + 2 * h * dv  # kv_norm's fp32 copy, rsqrt, normalised, output
        if input_bytes == 4:
            own += 4 * c  # two casts of a
        if m.q_lora_rank:
            own += 4 * m.q_lora_rank + 4 + 4 * m.q_lora_rank
    if kernel == "math":  # CPU: computed in fp32 (autocast inputs upcast), probabilities S per token
        sdpa = 4 * (2 * h * dqk + h * seq_len + h * dv)
    else:  # q, k (concatenated), v (a view of the kv projection), output, logsumexp
        sdpa = e * (2 * h * dqk + h * (dn + dv) + h * dv) + 4 * h
    return float(own + sdpa)


def ffn_bytes(m: ModelConfig, kind: str, precision: str = "bf16", input_bytes: int = 2) -> float:
    """Dense SwiGLU or MoE saved tensors per token (module docstring); ``input_bytes`` as for
    ``attention_bytes``."""
    _check(precision)
    c = m.dim
    casts = precision == "bf16" and input_bytes == 4  # of an fp32 input, by each bf16 matmul
    if kind == "dense":
        f = m.ffn_dim_dense
        return float(16 * f if precision == "fp32" else (4 * c if casts else 0) + 8 * f)
    k, e, fe, fs = m.n_activated_experts, m.n_routed_experts, m.moe_ffn_dim, m.n_shared_experts * m.moe_ffn_dim
    if precision == "fp32":
        return float(4 * e + 32 * k + 4 + 12 * k * c + 16 * k * fe + 16 * fs)
    if casts:  # the router takes the fp32 input itself; rows sorted in fp32, cast for the experts
        shared_casts = 4 * c if fs else 0
        return float(2 * c + 2 * e + 28 * k + 2 + 8 * k * c + 8 * k * fe + 8 * fs + shared_casts)
    # bf16 input: the router's fp32 copy, scores, indices, sort order, rows and outputs in bf16
    return float(4 * c + 4 * e + 30 * k + 4 + 6 * k * c + 8 * k * fe + 8 * fs)


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
    sb = stream_bytes(r, precision)
    for kind in kinds:
        layer += attention_bytes(m, seq_len, precision, kernel, sb) if kind == "attn" else ffn_bytes(m, kind, precision, sb)
    if lr is not None and kinds:
        residual += sb * r.streams * m.dim * math.ceil(len(kinds) / lr)
    other = (EMBED_BYTES if first else 0.0) + (head_bytes(m, r, precision) if last else 0.0)
    if keeps_output and not last:
        other += sb * r.streams * m.dim
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
