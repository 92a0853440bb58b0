"""Model configuration (DeepSeek-V3-style MoE) and the named sizes of configs/model/."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 129280
    dim: int = 1280  # C
    n_layers: int = 12  # Transformer blocks (each = attention + FFN sublayer)
    n_dense_layers: int = 1  # leading blocks with a dense FFN instead of MoE
    # MLA
    n_heads: int = 16
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    kv_lora_rank: int = 512
    q_lora_rank: int = 0  # 0 = no query compression
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    # MoE
    n_routed_experts: int = 64
    n_activated_experts: int = 6
    n_shared_experts: int = 2
    moe_ffn_dim: int = 896  # hidden width of one expert
    dense_ffn_dim: int = 0  # 0 = (n_activated + n_shared) * moe_ffn_dim, DeepSeek-V3's ratio
    route_scale: float = 1.0
    norm_topk_prob: bool = True
    bias_update_speed: float = 0.001  # aux-loss-free balancing step (DeepSeek-V3 gamma)
    seq_aux_loss_coef: float = 0.0  # sequence-wise balance loss alpha (DeepSeek-V3: 1e-4)
    # Numerics and init
    norm_eps: float = 1e-20  # Table 5
    init_std: float = 0.006  # DeepSeek-V3
    scale_out_init: bool = True  # output projections std / sqrt(2 * n_layers)
    # Loss: > 0 computes the cross-entropy this many tokens at a time, never holding the whole
    # batch's fp32 logits (mhc_train/model/chunked_loss.py; forward then returns no logits);
    # 0 = the plain full-vocabulary loss.
    loss_chunk_tokens: int = 0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def ffn_dim_dense(self) -> int:
        return self.dense_ffn_dim or (self.n_activated_experts + self.n_shared_experts) * self.moe_ffn_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_sublayers(self) -> int:
        return 2 * self.n_layers

    def validate(self) -> None:
        def bad(field: str, reason: str) -> None:
            raise ValueError(f"model.{field}: {reason}")

        for f in ("vocab_size", "dim", "n_layers", "n_heads", "qk_nope_head_dim", "v_head_dim",
                  "kv_lora_rank", "n_routed_experts", "n_activated_experts", "moe_ffn_dim", "max_seq_len"):
            value = getattr(self, f)
            if not isinstance(value, int) or value < 1:
                bad(f, f"must be an integer >= 1, got {value!r}")
        for f in ("n_dense_layers", "n_shared_experts", "q_lora_rank", "dense_ffn_dim", "qk_rope_head_dim",
                  "loss_chunk_tokens"):
            value = getattr(self, f)
            if not isinstance(value, int) or value < 0:
                bad(f, f"must be an integer >= 0, got {value!r}")
        if self.n_dense_layers > self.n_layers:
            bad("n_dense_layers", f"{self.n_dense_layers} leading dense layers exceed n_layers={self.n_layers}")
        if self.n_activated_experts > self.n_routed_experts:
            bad("n_activated_experts",
                f"top-k {self.n_activated_experts} exceeds the {self.n_routed_experts} routed experts")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.qk_rope_head_dim > self.qk_nope_head_dim:
            bad("qk_rope_head_dim",
                f"RoPE dim {self.qk_rope_head_dim} exceeds the per-head dim {self.qk_nope_head_dim}")
        if self.rope_theta <= 0:
            bad("rope_theta", f"must be > 0, got {self.rope_theta}")
        if self.norm_eps < 0:
            bad("norm_eps", f"must be >= 0, got {self.norm_eps}")
        if self.init_std <= 0:
            bad("init_std", f"must be > 0, got {self.init_std}")
        if self.bias_update_speed < 0 or self.seq_aux_loss_coef < 0:
            bad("bias_update_speed/seq_aux_loss_coef", "must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


def load_model_config(name: str, **overrides) -> ModelConfig:
    """The named size from ``configs/model/<name>.yaml`` (tiny, small, 3b, 9b, 27b), with overrides."""
    path = CONFIG_ROOT / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_ROOT / "model").glob("*.yaml"))
        raise ValueError(f"model: unknown size {name!r}; known sizes: {', '.join(known)}")
    values = yaml.safe_load(path.read_text()) or {}
    values.pop("defaults", None)
    values.update(overrides)
    known_fields = {f.name for f in fields(ModelConfig)}
    for key in values:
        if key not in known_fields:
            raise ValueError(f"model.{key}: unknown field (in {path.name} or overrides)")
    return ModelConfig(**values)
