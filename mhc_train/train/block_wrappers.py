"""What wraps each transformer block before the data-parallel wrappers, in torchtitan's order:
activation checkpointing, then ``torch.compile``, then (in the layouts) FSDP / DDP / DeepSpeed.

    wrap_blocks(root, cfg)   root: the whole model or one pipeline stage's module; the blocks may
                             still be on the meta device (nothing here allocates)

The model knows nothing of this (torchtitan's separation of model and parallelism): the options
live in ``cfg.train`` and are applied by the layouts, once per root, before materialisation.
"""

from __future__ import annotations

from torch import nn


def blocks_of(root: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a model or of a pipeline stage (a ModuleDict keyed by index)."""
    blocks = root.blocks
    return list(blocks.values()) if isinstance(blocks, nn.ModuleDict) else list(blocks)


def wrap_blocks(root: nn.Module, cfg, fsdp_mixed_precision: bool = False) -> None:
    """``fsdp_mixed_precision``: the layout will shard the blocks with FSDP in bf16, giving some of
    their submodules fp32 groups of their own (``data_parallel.inner_groups``)."""
    from mhc_train.parallel.data_parallel import inner_groups
    from mhc_train.train.activation_checkpoint import apply_activation_checkpointing
    from mhc_train.train.compile import apply_compile

    blocks = blocks_of(root)
    apply_activation_checkpointing(blocks, cfg.train.activation_checkpoint, cfg)
    apply_compile(blocks, cfg.train.compile, cfg,
                  around={m for b in blocks for m in inner_groups(b, fsdp_mixed_precision)})
