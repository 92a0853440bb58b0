"""``train.inject_nonfinite_at``: make chosen steps non-finite, as an overflow would, for the tests
of the skip logic (and a user who wants to see it work), without the layouts knowing.

For the step, a process-wide forward hook multiplies every token embedding's output by NaN. The
loss of every micro-batch, every gradient downstream of the embedding (all of them) and, in a
pipeline, the activations every later stage receives become NaN, whatever engine runs the step:
DDP, FSDP, DeepSpeed and the pipeline's worker threads all call the same modules.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _poison(module: nn.Module, args, output):
    if isinstance(module, nn.Embedding):
        return output * float("nan")
    return None


@contextlib.contextmanager
def nonfinite_step(enabled: bool):
    """Within: every ``nn.Embedding`` forward returns NaN (when ``enabled``)."""
    if not enabled:
        yield
        return
    handle = torch.nn.modules.module.register_module_forward_hook(_poison)
    try:
        yield
    finally:
        handle.remove()
