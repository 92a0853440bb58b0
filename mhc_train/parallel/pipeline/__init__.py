"""Pipeline parallelism on ``torch.distributed.pipelining``: stage splitting and schedules.

    model (full, or the same init on every rank)
      -> stage_blocks:  contiguous blocks per stage, balanced by a cost estimate or given
      -> PipelineStageModule per local stage (the model's own modules, global names kept)
      -> torch PipelineStage (static shapes) -> schedule by name (gpipe ... dualpipev)
      -> DualPipeV: OVERLAP_F_B handler (mhc_train.parallel.pipeline.overlap)

Every stage boundary carries streams ``[b, S, n, C]`` (n = 1 for the baseline): the first stage
maps tokens to streams, the last maps streams to logits and the schedule's ``loss_fn`` turns
those into the loss. Residual recomputation restarts at each stage's first sublayer, so a
recompute block never crosses a stage and its input x_l0 is the stage's own input.

The model never imports this package: the stage module borrows the model's methods
(``embed_streams``, ``head_logits``, ``rope``, ``recompute_plan``) instead of copying them.

Layout (each file imports only ones above it):
- ``config``: PipelineConfig, the schedules by name and the constraints (validate_pipeline,
  stages per rank, stage -> rank).
- ``balance``: stage costs (block_cost, model_costs) and blocks per stage (balance_stages,
  balance_v_ranks, plan_stage_blocks).
- ``overlap``: the DualPipe-style OVERLAP_F_B handler (OverlapFBHandler, post_res_regions).
- ``stages``: PipelineStageModule and the autograd identities at its boundaries.
- ``runtime``: lm_loss, build_pipeline, the Pipeline it returns (step, evaluate) and the
  forward-only schedule for validation.

The names other code uses are re-exported here: ``from mhc_train.parallel.pipeline import
build_pipeline`` works.
"""

from mhc_train.parallel.pipeline.config import (
    SCHEDULE_CLASSES,
    SCHEDULES,
    SINGLE_STAGE_SCHEDULES,
    V_SCHEDULES,
    PipelineConfig,
    PipelineConfigError,
    check_stage_blocks,
    local_stages,
    normalize_schedule_name,
    resolve_stages_per_rank,
    stage_to_rank,
    validate_pipeline,
)
from mhc_train.parallel.pipeline.balance import (
    balance_stages,
    balance_v_ranks,
    block_cost,
    model_costs,
    plan_stage_blocks,
    stage_block_ranges,
)
from mhc_train.parallel.pipeline.stages import PipelineStageModule, _InjectAuxLoss, _StandardLayoutGrad
from mhc_train.parallel.pipeline.runtime import (
    Pipeline,
    build_pipeline,
    build_pipeline_from_config,
    forward_only_schedule,
    lm_loss,
)

__all__ = [
    "Pipeline",
    "PipelineConfig",
    "PipelineConfigError",
    "PipelineStageModule",
    "SCHEDULES",
    "SCHEDULE_CLASSES",
    "SINGLE_STAGE_SCHEDULES",
    "V_SCHEDULES",
    "balance_stages",
    "balance_v_ranks",
    "block_cost",
    "build_pipeline",
    "build_pipeline_from_config",
    "check_stage_blocks",
    "forward_only_schedule",
    "lm_loss",
    "local_stages",
    "model_costs",
    "normalize_schedule_name",
    "plan_stage_blocks",
    "resolve_stages_per_rank",
    "stage_block_ranges",
    "stage_to_rank",
    "validate_pipeline",
]
