"""Data parallelism applied from outside the model: DDP, FSDP2 (``fully_shard``), DeepSpeed ZeRO.

    wrap = wrap_model(model, mode)      mode: single | ddp | fsdp | deepspeed
    wrap.forward_module(tokens, targets)   the module to call for the loss (DDP wrapper, FSDP root,
                                           DeepSpeed engine, or the model itself)
    wrap.model                             the model, unwrapped (moe_layers, update_router_biases,
                                           residual_gains, state dicts)

- **DDP**: ``forward_sync_buffers=False`` (buffers are synced once, at wrap time). The routers' ``expert_load`` buffers accumulate each
  rank's own counts during forward; broadcasting rank 0's buffers at every forward would
  overwrite them. The balancing ``expert_bias`` stays identical on every rank because every rank
  applies the same update from the all-reduced loads.
- **FSDP2**: ``fully_shard`` on every block, then on the root (embedding, contraction, norm and
  head stay in the root's group). Parameters become DTensors sharded on dim 0; the optimizer is
  built afterwards, on the sharded parameters. Buffers are not sharded.
- **DeepSpeed** (ZeRO stage 1 or 2, not with the pipeline): built from a torch optimizer (no
  JIT-compiled DeepSpeed ops); ``gradient_clipping`` is set from the run's ``train.grad_clip``
  (0 when off: DeepSpeed would otherwise clip at 1.0 by default). On a CPU set
  ``DS_ACCELERATOR=cpu`` before DeepSpeed is imported (``deepspeed_env``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

DP_MODES = ("single", "ddp", "fsdp", "deepspeed")


@dataclass
class Wrapped:
    model: nn.Module  # the model, unwrapped
    forward_module: nn.Module  # what the training step calls
    mode: str = "single"
    engine: Any = None  # the DeepSpeed engine (mode deepspeed)
    extra: dict = field(default_factory=dict)

    @property
    def shards_parameters(self) -> bool:
        return self.mode == "fsdp"


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool = False,
             bucket_cap_mb: float = 25.0) -> Wrapped:
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    ddp = DDP(model, device_ids=device_ids, forward_sync_buffers=False,
              find_unused_parameters=find_unused_parameters, bucket_cap_mb=bucket_cap_mb)
    return Wrapped(model, ddp, "ddp")


def shard_model(root: nn.Module, blocks, mesh, *, expert_mesh=None, reshard_after_forward: bool = True,
                mixed_precision: bool = False, materialize: Callable[[nn.Module], None] | None = None) -> None:
    """FSDP2 on ``root`` (the model or a pipeline stage): one ``fully_shard`` group per block of
    ``blocks``, then the root's own modules (embedding, contraction, norm, head) in the root group.

    ``mesh``: 1-D (FSDP) or 2-D ``(replicate, shard)`` (HSDP). Routed experts sharded over an EP
    mesh (DTensors, ``expert_parallel``) get their own group on ``expert_mesh`` (the data ranks
    outside their EP group), or stay out of FSDP when that is None (the EP group holds every copy).
    ``materialize(module)``: for a model built on the meta device, allocates and initialises one
    module's weights; it is called for each block right before that block is sharded, then for
    the root's own modules, so a rank never holds more than one block's full weights.

    ``mixed_precision`` (bf16 runs): FSDP gathers the weights in bf16 and reduces gradients in
    fp32. No group casts its inputs, and the embedding, the stream contraction, each router and
    each residual connection get groups of their own gathered in fp32 (``_fp32_parts``): the
    streams start from fp32 embeddings cast to ``residual.stream_dtype`` as in every layout,
    routing sees fp32 weights, and the connections' mappings (phi, alpha, bias) run on fp32
    weights, as under plain autocast in one process. A connection is entered through ``read``
    (its ``write`` uses no weight), which FSDP hooks as a forward (``register_fsdp_forward_method``);
    its group stays gathered from forward to its backward (a few MB for a whole 27B model), so
    ``residual.recompute`` finds it gathered and it costs one small all-gather per step and
    micro-batch, not two.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from mhc_train.parallel.expert_parallel import expert_modules, expert_parameters, is_expert_parallel

    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    fp32_kwargs = dict(kwargs)
    if mixed_precision:
        kwargs["mp_policy"], fp32_kwargs["mp_policy"] = _policies()
    ignored: set[nn.Parameter] = set()  # expert shards no FSDP group reduces
    for block in blocks:
        if materialize is not None:
            materialize(block)
        block_ignored = set()
        for experts in expert_modules(block):
            if not is_expert_parallel(experts):
                continue  # sharded with the block
            if expert_mesh is not None:
                fully_shard(experts, mesh=expert_mesh, **kwargs)
            else:
                block_ignored |= expert_parameters(experts)
        if mixed_precision:
            for part in _fp32_parts(block):
                fully_shard(part, mesh=mesh, **fp32_kwargs)
            for conn in _connections(block):
                fully_shard(conn, mesh=mesh, **{**fp32_kwargs, "reshard_after_forward": False})
                register_fsdp_forward_method(conn, "read")
        fully_shard(block, mesh=mesh, ignored_params=block_ignored or None, **kwargs)
        ignored |= block_ignored
    if materialize is not None:
        for name, child in root.named_children():
            if name != "blocks":
                materialize(child)
    if mixed_precision:
        for part in _fp32_parts(root, top=True):
            fully_shard(part, mesh=mesh, **fp32_kwargs)
    fully_shard(root, mesh=mesh, ignored_params=ignored or None, **kwargs)


def _policies():
    """(bf16 compute, fp32 compute) FSDP2 policies; both reduce in fp32 and leave inputs alone."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False),
            MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False))


def inner_groups(block: nn.Module, mixed_precision: bool) -> list[nn.Module]:
    """The submodules of a block that ``shard_model`` makes FSDP groups of their own (experts
    under expert parallelism aside): with ``mixed_precision`` its router and connections, whose
    weights are gathered in fp32. A compiled block must leave their FSDP hooks outside its graphs
    (``train.compile``)."""
    return [*_fp32_parts(block), *_connections(block)] if mixed_precision else []


def _fp32_parts(module: nn.Module, top: bool = False) -> list[nn.Module]:
    """The submodules whose weights FSDP gathers in fp32: a block's router, or (``top``) the
    model's or stage's embedding and stream contraction; those with parameters."""
    if top:
        names = [getattr(module, "embed", None), getattr(module, "contract", None)]
    else:
        names = [getattr(module.ffn, "router", None)]
    return [m for m in names if m is not None and any(True for _ in m.parameters())]


def _connections(block: nn.Module) -> list[nn.Module]:
    """A block's residual connections that have weights (HC's and mHC's; the baseline's has none)."""
    conns = [getattr(block, "attn_conn", None), getattr(block, "ffn_conn", None)]
    return [c for c in conns if c is not None and any(True for _ in c.parameters())]


def wrap_fsdp(model: nn.Module, device: torch.device, reshard_after_forward: bool = True,
              mixed_precision: bool = False,
              materialize: Callable[[nn.Module], None] | None = None) -> Wrapped:
    """FSDP2 over every process of the world (``shard_model`` on a 1-D mesh)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    shard_model(model, model.blocks, mesh, reshard_after_forward=reshard_after_forward,
                mixed_precision=mixed_precision, materialize=materialize)
    return Wrapped(model, model, "fsdp")


def deepspeed_env(device: torch.device) -> None:
    """DeepSpeed picks its accelerator at import; on a CPU it must be told before."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _skip_cpu_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at start-up (~90 s the
    first time, cached in ~/.cache/torch_extensions afterwards). Training communicates through
    torch.distributed (gloo) and does not use it (it serves DeepSpeed's inference all-reduce), so
    on a CPU it is not built."""
    import importlib

    try:  # by module path: ``deepspeed.comm.torch`` as an attribute is the torch package itself
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    except ImportError:  # another DeepSpeed layout: let it build
        return
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None


# DeepSpeed's default gradient bucket (5e8 elements, 2 GB in fp32) is allocated afresh every
# micro-step; a bucket never needs to hold more than the model.
DEFAULT_BUCKET_ELEMENTS = 500_000_000


def deepspeed_config(*, micro_batch: int, grad_accum: int, world_size: int, grad_clip: float | None,
                     zero_stage: int, bf16: bool, bf16_weights: bool = False,
                     bucket_elements: int = DEFAULT_BUCKET_ELEMENTS) -> dict[str, Any]:
    """``bf16``: the run computes in bf16. With fp32 weights (default) the module stays fp32 and
    DeepSpeed runs its forward under torch autocast, as one process does (without its
    ``torch_autocast`` section the engine would switch the trainer's autocast off); no module is
    declared lower-precision-safe, so every gradient is reduced in fp32. ``bf16_weights``:
    DeepSpeed's bf16 mode instead, the whole module in bf16 with fp32 master weights in the
    optimizer."""
    if zero_stage not in (1, 2):
        raise ValueError(f"parallel.zero_stage: DeepSpeed ZeRO stage 1 or 2, got {zero_stage}")
    precision: dict[str, Any] = {"bf16": {"enabled": bool(bf16 and bf16_weights), "check_grad_overflow": True}}
    if bf16 and not bf16_weights:
        precision["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        # DeepSpeed clips at 1.0 when this is absent; ours comes from train.grad_clip (0 = off).
        "gradient_clipping": float(grad_clip or 0.0),
        "zero_optimization": {"stage": zero_stage, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": int(bucket_elements), "allgather_bucket_size": int(bucket_elements)},
        # bf16 weights: skip steps with non-finite gradients (also the default; stated because the
        # trainer relies on it; with fp32 weights ZeRO skips on a non-finite norm by itself) and
        # all-reduce gradients in fp32, as FSDP does. (An fp32 grad_accum_dtype would switch ZeRO-1
        # to DeepSpeed's BF16_Optimizer, whose reported grad norm disagreed with one process by
        # 1.5x in a CPU check; ZeRO-1/2's own optimizer agreed to 2e-4.)
        **precision,
        "communication_data_type": "fp32",
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def wrap_deepspeed(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, *,
                   micro_batch: int, grad_accum: int, grad_clip: float | None, zero_stage: int = 1,
                   bf16: bool = False, bf16_weights: bool = False) -> Wrapped:
    """A DeepSpeed engine around ``model`` and the run's own torch optimizer (no JIT-built ops)."""
    deepspeed_env(device)
    import deepspeed

    if device.type == "cpu":
        _skip_cpu_shm_op()

    n_params = sum(p.numel() for p in model.parameters())
    config = deepspeed_config(micro_batch=micro_batch, grad_accum=grad_accum, world_size=dist.get_world_size(),
                              grad_clip=grad_clip, zero_stage=zero_stage, bf16=bf16, bf16_weights=bf16_weights,
                              bucket_elements=min(DEFAULT_BUCKET_ELEMENTS, n_params))
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                      dist_init_required=False)
    return Wrapped(model, engine, "deepspeed", engine=engine, extra={"optimizer": ds_optimizer, "config": config})


def wrap_model(model: nn.Module, mode: str, device: torch.device, **kwargs: Any) -> Wrapped:
    """Apply the data-parallel ``mode`` (see the module docstring); ``single`` returns the model."""
    if mode == "single" or (mode in ("ddp", "fsdp") and not (dist.is_available() and dist.is_initialized())):
        return Wrapped(model, model, "single")
    if mode == "ddp":
        return wrap_ddp(model, device, **kwargs)
    if mode == "fsdp":
        return wrap_fsdp(model, device, **kwargs)
    raise ValueError(f"parallel.mode: {mode!r} is wrapped with wrap_deepspeed (needs the optimizer) "
                     f"or is not a data-parallel mode ({', '.join(DP_MODES)})")


def full_value(x: torch.Tensor | float) -> float:
    """A float from a plain tensor or a (replicated / partial) DTensor, e.g. FSDP's grad norm."""
    if isinstance(x, torch.Tensor):
        try:
            from torch.distributed.tensor import DTensor

            if isinstance(x, DTensor):
                x = x.full_tensor()
        except ImportError:  # pragma: no cover
            pass
        return float(x)
    return float(x)
