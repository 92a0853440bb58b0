"""Configuration of the residual connection (``residual=baseline|hc|mhc``).

Paper-silent defaults are chosen here and explained in docs/model.md ("Residual defaults").
"""

from __future__ import annotations

from dataclasses import dataclass

from mhc_train.residual.recompute import parse_recompute

VARIANTS = ("baseline", "hc", "mhc")
CONTRACTIONS = ("sum", "mean", "learned")
FIXED_MAPPINGS = ("pre", "post", "res")


STREAM_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ResidualConfig:
    variant: str = "mhc"
    # Expansion rate: number of residual streams. Forced to 1 for the baseline.
    n: int = 4
    # Sinkhorn-Knopp iterations (mHC only), each = one column then one row normalisation.
    t_max: int = 20
    # Gating factors alpha (mHC) / dynamic scales s_alpha, s_beta (HC); paper Table 5: 0.01.
    alpha_init: float = 0.01
    # mHC bias init, in logit space (paper silent). The home stream of a sublayer (its
    # index % n, as in HC) gets pre_bias_home, the others pre_bias_other: this breaks the
    # symmetry between streams, which would otherwise never diverge.
    pre_bias_home: float = 3.0
    pre_bias_other: float = -3.0
    # 2 * sigmoid(0) = 1: every stream receives the full layer output, as in HC's init.
    post_bias: float = 0.0
    # exp(res_bias_diag) on the diagonal: Sinkhorn gives a near-identity H_res with
    # diagonal ~0.95 for n=4 that still passes gradient (a saturated one would not).
    res_bias_diag: float = 4.0
    res_bias_off: float = 0.0
    # Std of the mHC projection phi (HC: dynamic weights start at zero, so do we).
    phi_init_std: float = 0.0
    # Added under the root of the coefficient RMS (Eq 15 prints none; 0 reproduces it).
    rms_eps: float = 1e-20
    # HC: dynamic (input-dependent tanh) maps on top of the static ones.
    dynamic: bool = True
    # How the n streams become one before the final norm: sum (HC), mean, or learned weights.
    contraction: str = "sum"
    # Table 1 ablations: replace a mapping by a fixed one (pre: 1/n, post: ones, res: identity).
    fix_pre: bool = False
    fix_post: bool = False
    fix_res: bool = False
    # Implementation of the mHC ops: auto (Triton on CUDA after a self-test, torch elsewhere) |
    # torch | triton (mhc_train/residual/backend.py).
    backend: str = "auto"
    # Recompute the residual-stream ops in backward over blocks of sublayers (paper Table 3):
    # off, auto (Eq 20's L_r* = round(sqrt(nL/(n+2))), L = sublayers) or a block size L_r.
    recompute: str = "off"
    # dtype of the residual streams between sublayers: auto (the autocast dtype when autocast is
    # on, so bf16 in a bf16 run, as in the paper; else the embedding's) | float32 | bfloat16.
    # The same in every parallel layout; the mappings run in fp32 whatever it is.
    stream_dtype: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def streams(self) -> int:
        return 1 if self.variant == "baseline" else self.n

    def validate(self) -> None:
        def bad(field: str, reason: str) -> None:
            raise ValueError(f"residual.{field}: {reason}")

        if self.variant not in VARIANTS:
            bad("variant", f"must be one of {VARIANTS}, got {self.variant!r}")
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"expansion rate must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.t_max, int) or self.t_max < 1:
            bad("t_max", f"Sinkhorn iterations must be an integer >= 1, got {self.t_max!r}")
        if self.contraction not in CONTRACTIONS:
            bad("contraction", f"must be one of {CONTRACTIONS}, got {self.contraction!r}")
        if self.rms_eps < 0:
            bad("rms_eps", f"must be >= 0, got {self.rms_eps}")
        if self.backend not in ("torch", "triton", "auto"):
            bad("backend", f"must be torch, triton or auto, got {self.backend!r}")
        if self.stream_dtype not in STREAM_DTYPES:
            bad("stream_dtype", f"must be one of {', '.join(STREAM_DTYPES)}, got {self.stream_dtype!r}")
        try:
            parse_recompute(self.recompute)
        except ValueError as exc:
            bad("recompute", str(exc).removeprefix("recompute "))
        if self.variant == "baseline" and (self.fix_pre or self.fix_post or self.fix_res):
            bad("fix_*", "ablation switches apply to hc and mhc only")
