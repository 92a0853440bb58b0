"""``train.compile=true``: ``torch.compile`` of each transformer block, as torchtitan compiles.

Per block, not the whole model: the blocks are the unit that pipeline stages cut and FSDP wraps,
each is compiled on its own, and the embedding, stream expansion / contraction, head and loss stay
eager. How, and why:

- ``block.compile()`` (``nn.Module.compile``), not ``torch.compile(block)``: the block stays the
  same module object, so parameter names, state-dict keys and checkpoints do not change
  (``torch.compile(module)`` returns an ``OptimizedModule`` whose keys gain ``_orig_mod.``).
  Forward hooks (FSDP2's) still run eagerly around the compiled forward.
- ``fullgraph=True``: a graph break inside a block is an error at the first step, never a silent
  slow path. The connections and the MoE trace whole (tests/test_compile.py counts the breaks):
  no host syncs, the experts' grouped GEMM behind an opaque op in fp32 (``moe.grouped_mm``),
  the connection ops as opaque custom ops (``torch.ops.mhc.*``, forward and backward, with the
  torch reference or the Triton kernels inside: ``residual/custom_ops.py``). ``settle_backend``
  runs ``residual.backend=auto``'s self-test eagerly before the first trace, so a compiled block
  calls the Triton kernels where auto would (CUDA), the reference elsewhere.
- ``isolate_recompiles=True``: every block runs the same code (``Module._call_impl`` inlining
  ``Block.forward``) and dynamo keeps its compiled entries per code object. The blocks differ in
  constants it specialises on (the block index, a dense or MoE FFN), so they would share one
  cache line and its limit of 8 entries (``recompile_limit``): from the ninth block on they
  would fail under fullgraph (or, without it, silently run eager). Isolated, each block counts
  only its own entries: training, evaluation (``eval()``, no grad), gain recording.
- ``dynamic=False``: a run's shapes are fixed (batch, sequence length); static shapes keep the
  Python loops over sizes in the residual ops plain unrolled loops, and a new shape (another
  validation batch) is one more entry, not a dynamic-shape graph.

Compiling is lazy: here the wrapper is only set, so the blocks may still be on the meta device
(``wrap_blocks`` runs before materialisation); the first forward of each kind compiles (on 2 CPU
cores: 40 s to a few minutes for the tiny model's three blocks, docs/benchmarks.md).

Under FSDP in bf16 the blocks' routers and connections are FSDP groups of their own (fp32
weights); their hooks cannot sit inside a graph, so a block is compiled as the submodules that
hold none (``compile_targets``; measured in tests/dist_scripts/stream_dtype_check.py).

What does not compile is refused when the config is validated (``train.compile``):
``residual.recompute`` without activation checkpointing (saved-tensor hooks keyed by storage
inside the block), expert parallelism (the all-to-all's split sizes are read on the host).
"""

from __future__ import annotations

import os

from torch import nn

# Entries per block: training, evaluation, gain recording (first and later forwards of one
# recording), and a margin for shapes that change (validation or gain batches of another size).
RECOMPILE_LIMIT = 8


def apply_compile(blocks: list[nn.Module], enabled: bool, cfg=None, backend: str | None = None,
                  around: set[nn.Module] = frozenset()) -> None:
    """Compile each block in place (the module docstring). ``backend``: inductor unless given, or
    ``MHC_COMPILE_BACKEND`` (``aot_eager`` / ``eager`` to bisect a difference from eager runs).
    ``around``: submodules that will be FSDP groups of their own (``compile_targets``)."""
    if not enabled:
        return
    backend = backend or os.environ.get("MHC_COMPILE_BACKEND") or "inductor"
    if cfg is not None and splits_backward(cfg):
        # zbv / dualpipev take the input gradients, then the weight gradients, from one graph in
        # two passes (retain_graph); AOT autograd's donated buffers (saved tensors reused for the
        # backward's outputs) allow only one pass, and refuse the first. Process-wide, as the
        # compilation happens later, at the first forward.
        import torch._functorch.config

        torch._functorch.config.donated_buffer = False
    if any(getattr(block.forward, "activation_checkpoint", False) for block in blocks):
        # The forward's side effects inside torch.utils.checkpoint (router loads, the balance loss)
        # happen once, in the forward, as in eager (``moe.recomputed_forward``); dynamo refuses
        # them there unless told that the backward need not replay them.
        import torch._dynamo.config

        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    targets = [t for block in blocks for t in compile_targets(block, around)]
    budget = recompile_budget(len(targets))
    for target in targets:
        target.compile(backend=backend, fullgraph=True, dynamic=False, **budget)


def recompile_budget(n_compiled: int) -> dict:
    """``torch.compile``'s per-function recompile budget (``isolate_recompiles``, the module
    docstring), where this torch has it; an older one (the GPU machine's 2.11) keeps one
    process-wide budget per code object, raised so that ``n_compiled`` modules fit in it."""
    import inspect

    import torch
    import torch._dynamo.config as dynamo_config

    if {"recompile_limit", "isolate_recompiles"} <= set(inspect.signature(torch.compile).parameters):
        return {"recompile_limit": RECOMPILE_LIMIT, "isolate_recompiles": True}
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT * n_compiled))
    return {}


def compile_targets(module: nn.Module, around: set[nn.Module]) -> list[nn.Module]:
    """``module`` itself, or, when it holds a module of ``around``, its largest submodules that
    hold none (torchtitan's weaving around FSDP-wrapped experts). FSDP's hooks on a module inside
    a compiled graph are a graph break, an error under ``fullgraph``: with FSDP in bf16 the routers
    and connections are FSDP groups of their own (fp32 weights), so a block compiles as its
    attention, norms and FFN (a MoE as its experts and shared experts); the glue between them, the
    routers and the connections (custom ops, opaque to a graph anyway) run eagerly."""
    if module in around:
        return []
    if not any(m in around for m in module.modules()):
        return [module]
    return [t for child in module.children() for t in compile_targets(child, around)]


def settle_backend(cfg, device) -> str:
    """Resolve ``residual.backend`` on ``device`` now, eagerly (``auto``: its self-test on CUDA),
    so the compiled blocks find the choice made (``residual.backend``)."""
    from mhc_train.residual.backend import resolve_backend

    return resolve_backend(cfg.residual.backend, device)


def splits_backward(cfg) -> bool:
    """Whether the run's pipeline schedule splits backward into input and weight passes."""
    from mhc_train.parallel.pipeline import V_SCHEDULES, normalize_schedule_name

    p = cfg.parallel
    return p.mode in ("pipeline", "mesh") and normalize_schedule_name(p.pipeline.schedule) in V_SCHEDULES


def graph_break_count() -> int:
    """Graph breaks dynamo has recorded in this process so far (its counters are internal)."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())
