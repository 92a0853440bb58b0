"""The trainer's configuration: typed schemas of every config group and one place of checks.

``configs/config.yaml`` starts from the ``mhc_train_schema`` node registered here (the
``TrainConfig`` dataclass), so every group file is merged into a typed, closed node: an unknown
key or a value of the wrong type fails during composition, with the dotted key in the error.
The groups' own dataclasses (``ModelConfig``, ``ResidualConfig`` from the model and residual
packages, the ones below for the rest) are then constructed from the composed config, which
runs their ``__post_init__`` checks; ``validate`` adds the checks that span groups. Every
failure is a ``ConfigError`` whose message starts with the dotted key, e.g.
``residual.n: expansion rate must be an integer >= 1, got 0``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from mhc_train.model.config import ModelConfig
from mhc_train.nested import flatten  # noqa: F401  (re-exported: checkpoint.py and others import it here)
from mhc_train.parallel.pipeline import PipelineConfig
from mhc_train.residual.config import ResidualConfig
from mhc_train.residual.recompute import parse_recompute
from mhc_train.train.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SCHEMA_NAME = "mhc_train_schema"

# Learning rates of the mHC paper's Table 5 for its sizes; the small sizes were tuned on CPU
# runs of the bundled corpus (docs/training.md).
ACTIVATION_CHECKPOINT_MODES = ("none", "selective", "full")
DEFAULT_SEQ_LEN = 256  # train.seq_len (capped at model.max_seq_len)
DEFAULT_WARMUP_STEPS = 30  # optim.warmup_steps (capped for short runs)
DEFAULT_LR_BY_SIZE = {"tiny": 3.0e-3, "small": 3.0e-3, "3b": 8.6e-4, "9b": 5.9e-4, "27b": 4.0e-4}


@dataclass
class DataConfig:
    # bundled: the Shakespeare corpus shipped with the package, tokenized on first use and
    # cached ($MHC_TRAIN_CACHE or ~/.cache/mhc-train); prepared: a directory made by
    # mhc_train.data.prepare_dataset (data_recipes/).
    source: str = "bundled"
    path: Optional[str] = None  # the prepared directory (source=prepared)
    # The bundled tokenizer is trained to this vocabulary size (the model's by default).
    vocab_size: int = "${model.vocab_size}"  # type: ignore[assignment]
    cache_dir: Optional[str] = None  # bundled only; null = $MHC_TRAIN_CACHE/shakespeare-v{vocab}
    train_split: str = "train"
    val_split: str = "validation"
    # Packed sequences: attention stops at document boundaries and positions restart per document
    # (mhc_train/data/loader.py delivers the segment ids; not with pipeline stages).
    document_mask: bool = False


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: Optional[float] = None  # null: lr_by_size[model.name]
    lr_by_size: Dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LR_BY_SIZE))
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8  # Table 5 prints 1e-20; see docs/training.md
    weight_decay: float = 0.1
    decay_embeddings: bool = True
    warmup_steps: int = "${mhc.default_warmup:${train.steps},${optim.schedule},${optim.decay_at}}"
    schedule: str = "step"  # step (Table 5) | constant
    decay_at: List[float] = field(default_factory=lambda: [0.8, 0.9])  # fractions of train.steps
    decay_factors: List[float] = field(default_factory=lambda: [0.316, 0.1])  # of the base lr


PARALLEL_MODES = ("single", "ddp", "fsdp", "deepspeed", "pipeline", "mesh")


@dataclass
class ParallelConfig:
    # single: one process; ddp | fsdp (FSDP2 fully_shard per block + root) | deepspeed (ZeRO 1/2):
    # data parallel over torchrun's processes (mhc_train/parallel/data_parallel.py, docs/distributed.md);
    # pipeline: the model's blocks cut into stages over torchrun's processes (docs/pipeline.md);
    # mesh: pipeline x data x expert parallelism on one DeviceMesh (mhc_train/parallel/mesh.py).
    # fsdp = mesh with dp_shard = world, pipeline = mesh with pp = world, ddp = replicas of the world.
    mode: str = "single"
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_s: float = 1800.0  # a collective waiting longer fails the job (a hung or lost rank)
    # mesh degrees (-1: what is left of the world); pp x dp_replicate x dp_shard = world, ep | dp_shard
    pp: int = 1  # pipeline stages (parallel.pipeline holds the schedule)
    dp_replicate: int = 1  # data ranks holding full copies of the non-expert weights (HSDP's replicas)
    dp_shard: int = -1  # data ranks sharding the non-expert weights (FSDP2)
    ep: int = 1  # expert-parallel ranks, borrowed from dp_shard (mesh and fsdp)
    find_unused_parameters: bool = False  # ddp
    # FSDP2 (fsdp, mesh): free the gathered weights after forward (true) or keep them to backward;
    # null = true without pipeline stages, false with them (torchtitan's default; required by the
    # split-backward schedules zbv / dualpipev)
    reshard_after_forward: Optional[bool] = None
    zero_stage: int = 1  # deepspeed: 1 or 2
    # deepspeed under bf16: fp32 = fp32 weights, the forward under autocast (DeepSpeed's torch_autocast),
    # the numerics of every other layout; bf16 = DeepSpeed's bf16 mode: the module held in bf16
    # (2 bytes per weight and gradient less), its maths on bf16 weights, the mappings' phi included
    deepspeed_weights: str = "fp32"
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)  # mode pipeline


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "mhc-train"
    entity: Optional[str] = None
    name: Optional[str] = None  # null: run_name
    group: Optional[str] = None  # null: experiment.name
    tags: List[str] = field(default_factory=list)
    mode: str = "auto"  # auto (offline without an API key) | online | offline
    init_timeout: float = 30.0  # seconds; W&B is dropped for the run when init does not finish
    dir: Optional[str] = None  # null: the run directory


@dataclass
class LoggingConfig:
    progress: bool = True  # tqdm bar with loss and tokens/s (rank 0)
    log_every: int = 1  # steps between train records in metrics.jsonl / W&B
    plots: bool = True  # loss curve and H_res / gain figures under run_dir/figures
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ExperimentConfig:
    name: str = "default"
    notes: str = ""


@dataclass
class LoopConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch (per rank)
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = "${mhc.default_seq_len:${model.max_seq_len}}"  # 256, or the model's context if shorter
    seed: int = 0
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA with bf16, else fp32) | fp32 | bf16
    # torch.use_deterministic_algorithms (warn-only); null = on for CPU, off for CUDA (speed)
    deterministic: Optional[bool] = None
    # fp32 matmuls on CUDA (the mHC projection x phi, in fp32 by design): high = TF32 tensor cores
    # with fp32 accumulation, as the paper runs it; highest = IEEE fp32. CPU runs are left alone.
    matmul_precision: str = "high"
    threads: Optional[int] = None  # torch.set_num_threads; null = torch's default
    grad_clip: Optional[float] = 1.0  # max global grad norm; null or 0 = no clipping
    eval_every: int = 50  # steps between validation losses (and at the end); 0 = never
    eval_batches: int = 8
    checkpoint_every: int = 100  # steps between checkpoints (and one at the end); 0 = end only
    keep_checkpoints: int = 2  # newest complete checkpoints kept
    gains_every: int = 100  # steps between Amax gains / H_res figures (and at the end); 0 = never
    gains_sequences: int = 2  # validation sequences the gains are averaged over
    max_consecutive_skips: int = 5  # non-finite updates in a row before the run stops
    stop_at: Optional[int] = None  # stop (checkpoint, exit 0) after this step, as a preempted job
    peak_flops: Optional[float] = None  # per device, for MFU; null = from the GPU's name
    # Per block, before the data-parallel wrappers (mhc_train/train/block_wrappers.py):
    activation_checkpoint: str = "none"  # none | selective | full (composes with residual.recompute)
    compile: bool = False  # torch.compile each block (torchtitan's per-block compile)
    # Testing hook: the loss of these steps is replaced by NaN (exercises the skip logic).
    inject_nonfinite_at: List[int] = field(default_factory=list)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    # auto: continue from the newest complete checkpoint in run_dir (start fresh if none);
    # none: start fresh (earlier outputs in run_dir are moved aside); or a checkpoint / run dir.
    resume: str = "auto"
    output_root: str = "runs"
    run_name: str = "${model.name}-${residual.variant}-n${residual.n}"
    run_dir: str = "${hydra:runtime.output_dir}"


# ------------------------------------------------------------------------------ registration


def _join_run_name(name: str, overrides: str) -> str:
    """``run_name`` plus the overrides that are not already in it (empty -> just the name); a
    hash of them when they are long (the full list is in the run's .hydra/overrides.yaml)."""
    if not overrides:
        return name
    if len(overrides) > 100 or re.search(r"[^A-Za-z0-9_.:+@%\-]", overrides):
        overrides = "overrides-" + hashlib.sha256(overrides.encode()).hexdigest()[:12]
    return f"{name}+{overrides}"


def default_seq_len(max_seq_len: int) -> int:
    """train.seq_len's default: 256 tokens, or the model's whole context when that is shorter."""
    return min(DEFAULT_SEQ_LEN, int(max_seq_len))


def default_warmup(steps: int, schedule: str, decay_at) -> int:
    """optim.warmup_steps' default: 30 steps, fewer when the run is too short for them (the warmup
    ends by the first decay and by the last step), so every short run works unchanged."""
    limit = int(steps)
    if schedule == "step" and decay_at:
        limit = min(limit, decay_step(float(decay_at[0]), int(steps)))
    return max(0, min(DEFAULT_WARMUP_STEPS, limit))


def register_resolvers() -> None:
    """The ``${mhc.*:...}`` resolvers the YAML defaults use (idempotent; done on import, so a
    config composed without the app resolves too)."""
    for name, fn in (("mhc.run_leaf", _join_run_name), ("mhc.default_seq_len", default_seq_len),
                     ("mhc.default_warmup", default_warmup)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore and the resolvers into OmegaConf (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)
    register_resolvers()


# --------------------------------------------------------------------------------- validation


@dataclass
class RunConfig:
    """The validated configuration the trainer runs with (plain dataclasses, no OmegaConf)."""

    model: ModelConfig
    residual: ResidualConfig
    data: DataConfig
    optim: OptimConfig
    parallel: ParallelConfig
    logging: LoggingConfig
    experiment: ExperimentConfig
    train: LoopConfig
    resume: str
    run_name: str
    lr: float  # the resolved base learning rate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_known_keys(node: Any, cls: type, prefix: str) -> None:
    """Keys forced in with ``+key=value`` bypass the schema; refuse them here."""
    if not isinstance(node, DictConfig) or not dataclasses.is_dataclass(cls):
        return
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in node.keys():
        if key not in names:
            where = prefix[:-1] or "the config"
            raise ConfigError(f"{prefix}{key}: unknown key (no such field in {where})")
        if dataclasses.is_dataclass(hints.get(key)):
            _check_known_keys(node._get_node(key), hints[key], f"{prefix}{key}.")


def _section(cfg: DictConfig, key: str, cls):
    node = cfg[key]
    _check_known_keys(node, cls, f"{key}.")
    try:
        obj = OmegaConf.to_object(node)
    except ValueError as e:  # the dataclass' own __post_init__ checks
        raise ConfigError(str(e)) from None
    except Exception as e:  # interpolation / missing value inside the section
        raise ConfigError(omegaconf_message(e, default_key=key)) from None
    if not isinstance(obj, cls):
        raise ConfigError(f"{key}: expected a {cls.__name__} node, got {type(obj).__name__}")
    return obj


def omegaconf_message(e: BaseException, default_key: str = "") -> str:
    """``key: reason`` from an OmegaConf exception (its message is several lines long)."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

    key = getattr(e, "full_key", None) or default_key
    msg = getattr(e, "msg", None) or str(e)
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    if isinstance(e, MissingMandatoryValue):
        return f"{key}: missing mandatory value"
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and ("not in struct" in msg or "not in" in first):
        parent = key.rsplit(".", 1)[0] if "." in key else "the config"
        return f"{key}: unknown key (no such field in {parent})"
    return f"{key}: {first}" if key else first


def _check(cond: bool, key: str, reason: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {reason}")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def reshard_after_forward(parallel: ParallelConfig, pp: int) -> bool:
    """``parallel.reshard_after_forward`` with null resolved: true without pipeline stages, false with."""
    return parallel.reshard_after_forward if parallel.reshard_after_forward is not None else pp == 1


def _check_pipeline(p: PipelineConfig, world: int, model: ModelConfig, t: LoopConfig) -> None:
    """``world``: the pipeline's ranks (parallel.pp); ``t.batch_size`` is each data rank's batch."""
    from mhc_train.parallel.pipeline import PipelineConfigError, validate_pipeline

    _check(t.grad_accum == 1, "train.grad_accum",
           f"with pipeline stages the micro-batches accumulate: set train.grad_accum=1 and split "
           f"train.batch_size into parallel.pipeline.microbatches (got grad_accum={t.grad_accum})")
    try:
        schedule, _ = validate_pipeline(p.schedule, world, model.n_layers, p.microbatches, p.stages_per_rank,
                                        p.stage_blocks, t.batch_size)
    except PipelineConfigError as e:
        raise ConfigError(str(e)) from None
    _check(p.balance in ("stage", "rank"), "parallel.pipeline.balance", f"must be stage or rank, got {p.balance!r}")
    _check(p.balance == "stage" or schedule in ("zbv", "dualpipev"), "parallel.pipeline.balance",
           f"rank balancing is for the V schedules (zbv, dualpipev), not {schedule}")
    from mhc_train.parallel.pipeline.overlap import CONCURRENCY

    _check(p.overlap_concurrency in CONCURRENCY, "parallel.pipeline.overlap_concurrency",
           f"must be one of {', '.join(CONCURRENCY)}, got {p.overlap_concurrency!r}")


MESH_ONLY_DEFAULTS = {"pp": 1, "dp_replicate": 1, "dp_shard": -1}


def mesh_degrees(parallel: ParallelConfig, world: int, model: ModelConfig):
    """The ``MeshDegrees`` a layout runs with: from the keys for ``parallel=mesh``, fixed by the
    preset otherwise (ddp: replicas, fsdp: shards, pipeline: stages, all of the world)."""
    from mhc_train.parallel.mesh import MeshConfigError, MeshDegrees, resolve_degrees

    mode = parallel.mode
    if mode != "mesh":
        for key, default in MESH_ONLY_DEFAULTS.items():
            _check(getattr(parallel, key) == default, f"parallel.{key}",
                   f"is a degree of parallel=mesh; parallel={mode} fixes its layout (got {getattr(parallel, key)!r})")
        _check(parallel.ep == 1 or mode == "fsdp", "parallel.ep",
               f"expert parallelism runs with parallel=mesh or fsdp, not {mode} (got ep={parallel.ep!r})")
    if mode in ("single", "ddp", "deepspeed"):
        return MeshDegrees(dp_replicate=world)
    degrees = {"fsdp": dict(dp_shard=world, ep=parallel.ep), "pipeline": dict(pp=world, dp_shard=1)}.get(
        mode, dict(pp=parallel.pp, dp_replicate=parallel.dp_replicate, dp_shard=parallel.dp_shard, ep=parallel.ep))
    try:
        return resolve_degrees(world, **degrees, n_routed_experts=model.n_routed_experts,
                               has_moe=model.n_layers > model.n_dense_layers)
    except MeshConfigError as e:
        raise ConfigError(str(e)) from None


def resolve_lr(optim: OptimConfig, model: ModelConfig) -> float:
    if optim.lr is not None:
        _check(optim.lr > 0 and math.isfinite(optim.lr), "optim.lr", f"must be > 0, got {optim.lr}")
        return float(optim.lr)
    lr = optim.lr_by_size.get(model.name)
    _check(lr is not None, "optim.lr",
           f"no default learning rate for model {model.name!r} (optim.lr_by_size knows "
           f"{', '.join(sorted(optim.lr_by_size))}); set optim.lr")
    _check(lr > 0, f"optim.lr_by_size.{model.name}", f"must be > 0, got {lr}")
    return float(lr)


def validate(cfg: DictConfig) -> RunConfig:
    """Build the typed sections from a composed config and check every combination."""
    for key in cfg.keys():
        if key != "hydra" and key not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise ConfigError(f"{key}: unknown key (no such field in the config)")
    model = _section(cfg, "model", ModelConfig)
    residual = _section(cfg, "residual", ResidualConfig)
    data = _section(cfg, "data", DataConfig)
    optim = _section(cfg, "optim", OptimConfig)
    parallel = _section(cfg, "parallel", ParallelConfig)
    logging_cfg = _section(cfg, "logging", LoggingConfig)
    experiment = _section(cfg, "experiment", ExperimentConfig)
    train = _section(cfg, "train", LoopConfig)
    try:
        resume, run_name = str(cfg.resume), str(cfg.run_name)
    except Exception as e:
        raise ConfigError(omegaconf_message(e)) from None

    t = train
    for key in ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "keep_checkpoints",
                "max_consecutive_skips", "gains_sequences"):
        value = getattr(t, key)
        _check(_int(value) and value >= 1, f"train.{key}", f"must be an integer >= 1, got {value!r}")
    for key in ("eval_every", "checkpoint_every", "gains_every"):
        value = getattr(t, key)
        _check(_int(value) and value >= 0, f"train.{key}", f"must be an integer >= 0 (0 = off), got {value!r}")
    _check(t.seq_len <= model.max_seq_len, "train.seq_len",
           f"{t.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    _check(t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), "train.device",
           f"must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    _check(t.precision in ("auto", "fp32", "bf16"), "train.precision",
           f"must be auto, fp32 or bf16, got {t.precision!r}")
    _check(t.threads is None or t.threads >= 1, "train.threads", f"must be >= 1 or null, got {t.threads}")
    _check(t.activation_checkpoint in ACTIVATION_CHECKPOINT_MODES, "train.activation_checkpoint",
           f"must be one of {', '.join(ACTIVATION_CHECKPOINT_MODES)}, got {t.activation_checkpoint!r}")
    _check(t.grad_clip is None or (t.grad_clip >= 0 and math.isfinite(t.grad_clip)), "train.grad_clip",
           f"must be >= 0 or null (0/null = off), got {t.grad_clip}")
    _check(t.stop_at is None or 1 <= t.stop_at <= t.steps, "train.stop_at",
           f"must be between 1 and train.steps={t.steps} or null, got {t.stop_at}")
    _check(t.peak_flops is None or t.peak_flops > 0, "train.peak_flops", f"must be > 0 or null, got {t.peak_flops}")
    _check(t.matmul_precision in ("highest", "high"), "train.matmul_precision",
           f"must be high (TF32 on CUDA) or highest (IEEE fp32), got {t.matmul_precision!r}")
    bad = [s for s in t.inject_nonfinite_at if not _int(s) or s < 1]
    _check(not bad, "train.inject_nonfinite_at", f"steps count from 1, got {bad}")

    _check(optim.name == "adamw", "optim.name", f"only adamw is implemented, got {optim.name!r}")
    lr = resolve_lr(optim, model)
    _check(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas), "optim.betas",
           f"must be two numbers in [0, 1), got {list(optim.betas)}")
    _check(optim.eps > 0, "optim.eps", f"must be > 0 (the paper uses 1e-20), got {optim.eps}")
    _check(optim.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {optim.weight_decay}")
    _check(_int(optim.warmup_steps) and optim.warmup_steps >= 0, "optim.warmup_steps",
           f"must be an integer >= 0, got {optim.warmup_steps!r}")
    _check(optim.schedule in ("step", "constant"), "optim.schedule",
           f"must be step or constant, got {optim.schedule!r}")
    if optim.schedule == "step":
        _check(len(optim.decay_at) == len(optim.decay_factors), "optim.decay_factors",
               f"{len(optim.decay_factors)} factors for {len(optim.decay_at)} decay points (optim.decay_at)")
        _check(all(0 < a <= 1 for a in optim.decay_at) and list(optim.decay_at) == sorted(optim.decay_at),
               "optim.decay_at", f"must be increasing fractions of train.steps in (0, 1], got {list(optim.decay_at)}")
        _check(all(f > 0 for f in optim.decay_factors), "optim.decay_factors",
               f"must be > 0, got {list(optim.decay_factors)}")
        if optim.decay_at:
            first = decay_step(optim.decay_at[0], t.steps)
            _check(optim.warmup_steps <= first, "optim.warmup_steps",
                   f"warmup ({optim.warmup_steps} steps) must end before the first decay at step {first} "
                   f"(= {optim.decay_at[0]} x train.steps={t.steps})")
    _check(optim.warmup_steps <= t.steps, "optim.warmup_steps",
           f"warmup ({optim.warmup_steps} steps) is longer than train.steps={t.steps}")

    _check(data.source in ("bundled", "prepared"), "data.source",
           f"must be bundled or prepared, got {data.source!r}")
    if data.source == "prepared":
        _check(bool(data.path), "data.path", "data.source=prepared needs the prepared directory (data.path=DIR)")
    else:
        from mhc_train.data.tokenizer import MIN_VOCAB

        _check(_int(data.vocab_size) and data.vocab_size >= MIN_VOCAB, "data.vocab_size",
               f"the bundled tokenizer needs an integer >= {MIN_VOCAB} (256 byte pieces, unk/bos/eos and "
               f"one learned piece), got {data.vocab_size!r}")

    _check(parallel.mode in PARALLEL_MODES, "parallel.mode",
           f"must be one of {', '.join(PARALLEL_MODES)}, got {parallel.mode!r}")
    _check(parallel.backend in ("auto", "nccl", "gloo"), "parallel.backend",
           f"must be auto, nccl or gloo, got {parallel.backend!r}")
    _check(parallel.timeout_s > 0, "parallel.timeout_s", f"must be > 0 seconds, got {parallel.timeout_s}")
    _check(parallel.zero_stage in (1, 2), "parallel.zero_stage",
           f"DeepSpeed ZeRO stage 1 or 2 (3 is not supported here), got {parallel.zero_stage!r}")
    _check(parallel.deepspeed_weights in ("fp32", "bf16"), "parallel.deepspeed_weights",
           f"must be fp32 or bf16, got {parallel.deepspeed_weights!r}")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    _check(world == 1 or parallel.mode != "single", "parallel.mode",
           f"single runs one process, but WORLD_SIZE={world} (torchrun): choose parallel=ddp, fsdp, deepspeed, "
           "pipeline or mesh")
    _check(parallel.mode not in ("deepspeed", "pipeline") or "WORLD_SIZE" in os.environ, "parallel.mode",
           f"{parallel.mode} runs under torchrun (e.g. torchrun --standalone --nproc_per_node=2 -m mhc_train.train "
           f"parallel={parallel.mode})")
    degrees = mesh_degrees(parallel, world, model)
    _check(not (model.loss_chunk_tokens and degrees.pp > 1), "model.loss_chunk_tokens",
           "not supported with pipeline stages (pp > 1): the last stage returns logits, and the loss is taken from them")
    if t.compile:  # what dynamo cannot trace (mhc_train/train/compile.py)
        _check(parse_recompute(residual.recompute) is None or t.activation_checkpoint != "none", "train.compile",
               "not with residual.recompute alone (its saved-tensor hooks work by storage inside the block); "
               "use train.activation_checkpoint=selective or full instead, or residual.recompute=off")
        _check(degrees.ep == 1, "train.compile",
               "not with expert parallelism (parallel.ep > 1: the all-to-all's split sizes are read on the host)")
        _check(parallel.mode != "deepspeed", "train.compile", "not with parallel=deepspeed (untested)")
    _check(not (data.document_mask and degrees.pp > 1), "data.document_mask",
           "not supported with pipeline stages (pp > 1): the stage boundaries carry streams only")
    if degrees.pp > 1:
        _check_pipeline(parallel.pipeline, degrees.pp, model, t)
        from mhc_train.parallel.pipeline import V_SCHEDULES, normalize_schedule_name

        _check(parallel.pipeline.overlap_concurrency != "threads" or degrees.dp == 1,
               "parallel.pipeline.overlap_concurrency",
               "threads runs a pair's two chunks freely side by side, so their collectives (FSDP, expert "
               "all-to-all) could be issued in another order on each rank: use phases (auto) with data ranks")
        split_backward = normalize_schedule_name(parallel.pipeline.schedule) in V_SCHEDULES
        _check(not (split_backward and degrees.dp > 1 and reshard_after_forward(parallel, degrees.pp)),
               "parallel.reshard_after_forward",
               f"true with {parallel.pipeline.schedule}: its split backward computes the weight gradients after FSDP "
               "freed the gathered weights (wrong gradients, measured); use false or null")

    _check(_int(logging_cfg.log_every) and logging_cfg.log_every >= 1, "logging.log_every",
           f"must be an integer >= 1, got {logging_cfg.log_every!r}")
    _check(logging_cfg.wandb.mode in ("auto", "online", "offline"), "logging.wandb.mode",
           f"must be auto, online or offline, got {logging_cfg.wandb.mode!r}")
    _check(logging_cfg.wandb.init_timeout > 0, "logging.wandb.init_timeout",
           f"must be > 0 seconds, got {logging_cfg.wandb.init_timeout}")

    _check(bool(experiment.name) and "/" not in experiment.name, "experiment.name",
           f"must be a non-empty name without '/', got {experiment.name!r}")
    _check(bool(run_name) and "/" not in run_name, "run_name", f"must be a non-empty name without '/', got {run_name!r}")
    _check(bool(resume), "resume", "must be auto, none or a checkpoint / run directory")
    if resume not in ("auto", "none"):
        _check(Path(resume).expanduser().exists(), "resume",
               f"{resume}: no such checkpoint or run directory (use auto, none or a path)")

    return RunConfig(model, residual, data, optim, parallel, logging_cfg, experiment, train, resume, run_name, lr)


def decay_step(fraction: float, steps: int) -> int:
    """The 0-based step from which a decay at ``fraction`` of ``steps`` applies."""
    return int(round(fraction * steps))


# --------------------------------------------------------------------------------- fingerprints

# Fields whose change makes a checkpoint's tensors unusable (shapes, or their meaning).
MODEL_SHAPE_KEYS = (
    "vocab_size", "dim", "n_layers", "n_dense_layers", "n_heads", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "kv_lora_rank", "q_lora_rank", "n_routed_experts", "n_shared_experts", "moe_ffn_dim",
    "dense_ffn_dim",
)
RESIDUAL_SHAPE_KEYS = ("variant", "streams", "dynamic", "contraction")


def shape_signature(model: ModelConfig, residual: ResidualConfig) -> dict[str, Any]:
    sig = {f"model.{k}": getattr(model, k) for k in MODEL_SHAPE_KEYS}
    sig.update({f"residual.{k}": getattr(residual, k) for k in RESIDUAL_SHAPE_KEYS})
    return sig


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


register_resolvers()
