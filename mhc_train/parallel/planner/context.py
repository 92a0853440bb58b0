"""What every layout of one model shares (``PlanContext``): parameter counts by block, the
pipeline stages each rank holds, per-rank parameters and activations, and schedule simulations."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from mhc_train.model.config import ModelConfig
from mhc_train.parallel.planner.activations import ActivationBytes, _check, stage_activation_bytes
from mhc_train.residual.config import ResidualConfig


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


def _rank_params(ctx: PlanContext, stages: list[RankStage], ep: int) -> tuple[float, float]:
    """(non-expert parameters, this rank's routed-expert parameters) of one pipeline rank."""
    ne = sum(ctx.params.blocks[i][0] for s in stages for i in s.blocks)
    ne += sum(ctx.params.first for s in stages if s.first) + sum(ctx.params.last for s in stages if s.last)
    ex = sum(ctx.params.blocks[i][1] for s in stages for i in s.blocks) / ep
    return ne, ex
