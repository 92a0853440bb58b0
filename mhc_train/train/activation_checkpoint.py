"""Activation checkpointing per transformer block: ``train.activation_checkpoint=none|selective|full``.

    none       autograd keeps what each op saves (``residual.recompute`` may still drop the
               residual-stream part, mhc_train/residual/recompute.py)
    full       each block's forward runs under ``torch.utils.checkpoint`` (non-reentrant): backward
               keeps only the block's input streams [B, S, n, C] and re-runs the whole block
    selective  the same region, with torch's selective activation checkpointing (SAC, torchtitan's
               "op" mode): inside attention and the FFN/MoE, the outputs of the weight matmuls
               (``mm``, ``addmm``, the experts' grouped GEMM) and of fused attention are kept;
               everything else is recomputed - norms, RoPE, activations, routing maths, the
               attention core on SDPA's math path, and every residual-stream op (connection
               read/write, Sinkhorn), which is what ``residual.recompute`` drops and more

Why this way:
- Op-level, not every k-th block: it keeps the costly products (the backward needs them and they
  are most of the FLOPs) and drops the many cheap element-wise outputs, so it saves memory on every
  block at a small recompute cost, and it works the same in every pipeline stage whatever its
  number of blocks. A matmul is kept only inside a sublayer's layer function (the "layer" region
  the block marks): the connections' products (H_res x: n C per token) are recomputed, else the
  selective mode would keep the very streams the mHC recompute exists to drop.
- The block's ``forward`` is replaced (an instance attribute), not the module wrapped: no
  ``CheckpointWrapper`` appears in the module tree, so parameter names (DCP checkpoint keys),
  FSDP groups and pipeline stage names are unchanged.
- Non-reentrant checkpointing: the pipeline runtime calls ``autograd.grad`` (reentrant
  checkpointing breaks non-first stages) and FSDP2 hooks compose with it.
- ``residual.recompute``: its saved-tensor hooks are entered inside the block, so they would
  take every save of the block away from the checkpoint's own hooks (innermost hooks win) and
  ``full`` would silently keep everything. Inside a checkpointed block the recompute plan is
  therefore replaced by plain regions: the checkpoint already recomputes all that the plan would
  (the block input is its only kept stream tensor). The combination is allowed and gives the
  same losses; residual.recompute saves nothing further where every block is checkpointed.
- Schedules that split a backward into input and weight gradients (zbv, dualpipev) recompute a
  checkpointed block in each of the two passes (torch keeps recomputed tensors per backward
  call); selective's kept outputs serve both (``_ReusedOutputs``: torch's own SAC allows one).
- Side effects of the forward run once: the re-run forward is marked
  (``mhc_train.model.moe.recomputed_forward``), so routers do not count their expert loads twice.
- No gradient (evaluation, the gain report): the forward runs plainly.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from mhc_train.model.moe import recomputed_forward
from mhc_train.model.transformer import PLAIN_REGIONS
from mhc_train.residual.recompute import RecomputePlan, current_region

MODES = ("none", "selective", "full")


def _saved_ops() -> frozenset:
    """The ops whose outputs selective checkpointing keeps (inside a layer function): weight
    matmuls and fused attention kernels, those this torch build has."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu"]
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    custom = getattr(torch.ops, "mhc_train", None)  # the experts' grouped GEMM as an opaque op (compile)
    if custom is not None and hasattr(custom, "grouped_mm"):
        ops.add(custom.grouped_mm.default)
    return frozenset(ops)


def _selective_policy(saved: frozenset):
    def policy(ctx, func, *args, **kwargs):
        region = current_region()
        if func in saved and region is not None and region[0] == "layer":
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _full_contexts():
    return contextlib.nullcontext(), _Recomputation()


def _selective_contexts(policy):
    caching, cached = create_selective_checkpoint_contexts(policy)
    if _ReusedOutputs is not None:
        cached = _ReusedOutputs(None, cached.storage, cached.allow_cache_entry_mutation)
    return caching, _Recomputation(cached)


def _reused_outputs_mode():
    """torch's SAC hands each kept output out once and refuses a second backward through the
    region. The zero-bubble schedules (zbv, dualpipev) split a backward into input and weight
    gradients, two passes that each recompute the block: this mode hands the kept outputs out to
    every recomputation (they are freed with the checkpoint, after the block's last backward pass).
    Built on torch's private SAC mode (torch >= 2.13); None when that is gone (a split backward
    then raises torch's error)."""
    try:
        from torch.utils._pytree import tree_map
        from torch.utils.checkpoint import _RECOMPUTE, SAC_IGNORED_OPS, _CachedTorchDispatchMode, _sac_storage_key
    except ImportError:
        return None

    class ReusedOutputs(_CachedTorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in SAC_IGNORED_OPS:
                return func(*args, **kwargs)
            key = _sac_storage_key(func, args)
            idx = self.func_counter[key]
            self.func_counter[key] += 1
            entry = self.storage.get(key, {}).get(idx)
            if entry is None:
                raise RuntimeError(f"{func} (call {idx}) was not run by the checkpointed forward: the "
                                   "recomputation differs from it")
            if entry is _RECOMPUTE:
                return func(*args, **kwargs)
            return tree_map(lambda x: x.get_val(self.allow_cache_entry_mutation), entry)

    return ReusedOutputs


_ReusedOutputs = _reused_outputs_mode()


class _Recomputation:
    """The context of a recomputation: ``recomputed_forward`` (and the SAC mode that hands out the
    kept outputs). Entered once per backward pass that needs the block: twice when a schedule
    splits backward into input and weight gradients (zbv, dualpipev)."""

    def __init__(self, mode=None) -> None:
        self.mode = mode
        self.stack: list[contextlib.ExitStack] = []

    def __enter__(self):
        stack = contextlib.ExitStack()
        if self.mode is not None:
            stack.enter_context(self.mode)
        stack.enter_context(recomputed_forward())
        self.stack.append(stack)
        return self

    def __exit__(self, *exc):
        return self.stack.pop().__exit__(*exc)


def checkpoint_block(block: nn.Module, context_fn, compiled_context_fn=noop_context_fn) -> None:
    """Run ``block``'s forward(streams, rope, regions, mask) under non-reentrant checkpointing with
    ``context_fn``. While torch.compile traces it (``train.compile``, applied after this)
    ``compiled_context_fn``: compile accepts only torch's own dispatch modes there, and a compiled
    backward re-runs no Python, so no side effect of the forward can repeat. The class's forward
    is bound to the block (a deep copy of the model re-binds it to the copy)."""
    forward = type(block).forward

    def checkpointed(self, streams, rope, regions=None, mask=None):
        if isinstance(regions, RecomputePlan):
            regions = PLAIN_REGIONS  # the checkpoint recomputes what the plan would drop (module doc)
        if not torch.is_grad_enabled():
            return forward(self, streams, rope, regions, mask)
        contexts = compiled_context_fn if torch.compiler.is_compiling() else context_fn
        # Dynamo traces a checkpoint only without context_fn or with a selective-checkpoint one: pass
        # the no-op default by omission (as a keyword it fails under compile, train.compile with full).
        extra = {} if contexts is noop_context_fn else {"context_fn": contexts}
        return checkpoint(forward, self, streams, rope, regions, mask, use_reentrant=False, **extra)

    checkpointed.activation_checkpoint = True
    block.forward = types.MethodType(checkpointed, block)


def apply_activation_checkpointing(blocks: list[nn.Module], mode: str, cfg=None) -> None:
    """Checkpoint every block of ``blocks`` in ``mode`` (module docstring); none: nothing. The
    blocks may be on the meta device: nothing is allocated."""
    if mode not in MODES:
        raise ValueError(f"train.activation_checkpoint: must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        return
    if mode == "full":
        context_fn, compiled = _full_contexts, noop_context_fn
    else:
        policy = _selective_policy(_saved_ops())
        context_fn = functools.partial(_selective_contexts, policy)
        compiled = functools.partial(create_selective_checkpoint_contexts, policy)
    for block in blocks:
        if getattr(block.forward, "activation_checkpoint", False):
            raise ValueError(f"block {getattr(block, 'index', '?')}: activation checkpointing applied twice")
        checkpoint_block(block, context_fn, compiled)
