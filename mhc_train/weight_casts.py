"""Low-precision copies of the weights autocast does not cast, made once per step.

Autocast caches the bf16 copy of every weight it casts until its outermost region ends, and the
trainer holds one region over the step (``train.layouts.model_steps``), so each micro-batch and
each recomputation in backward reuses the copies of the first forward. That cache holds only the
casts autocast makes itself, for the ops on its lists: ``torch._grouped_mm`` is on none, so
``RoutedExperts`` casts its stacked weights itself - once per forward, per micro-batch and per
recomputation, the largest weights of a MoE model - and so does ``RMSNorm`` (an elementwise
product, rounded to its input's dtype). ``step_region`` opens autocast together with a cache of
those copies, kept until its outermost exit, as autocast keeps its own.

What the cache holds, and why it is safe:
- only leaf tensors that require grad, cast with grad enabled (the copy's graph then reaches the
  weight's gradient accumulator from every micro-batch: ``ToCopyBackward`` saves no tensor, so
  several backward passes may run through it, as through autocast's own copies). A weight seen
  through expert parallelism's DTensor or gradient scaling is no leaf: cast per forward, as before;
- keyed by the weight object, its version counter and the dtype: a weight changed in place (an
  optimizer step inside the region) misses instead of returning a stale copy;
- not while torch.compile traces (``train.compile``): a compiled block is one graph per call.
The region is one for all threads (the pipeline's worker threads run forwards inside the step's
region), as autocast's cache is.
"""

from __future__ import annotations

import contextlib
import threading

import torch

_lock = threading.Lock()
_depth = 0
_copies: dict[int, tuple[torch.Tensor, int, torch.dtype, torch.Tensor]] = {}


@contextlib.contextmanager
def weight_cast_cache():
    """Keep the weights' low-precision copies until the outermost of these exits."""
    global _depth
    with _lock:
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _copies.clear()


@contextlib.contextmanager
def step_region(device_type: str, dtype: torch.dtype = torch.bfloat16):
    """``torch.autocast(device_type, dtype)`` with the weights' own copies cached alongside."""
    with torch.autocast(device_type, dtype=dtype), weight_cast_cache():
        yield


def cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)``, from the cache inside a ``weight_cast_cache`` when it may be cached."""
    if weight.dtype == dtype:
        return weight
    cacheable = (_depth > 0 and weight.is_leaf and weight.requires_grad and torch.is_grad_enabled()
                 and not torch.compiler.is_compiling())
    if not cacheable:
        return weight.to(dtype)
    hit = _copies.get(id(weight))
    if hit is not None and hit[0] is weight and hit[1] == weight._version and hit[2] == dtype:
        return hit[3]
    copy = weight.to(dtype)
    with _lock:
        if _depth > 0:
            _copies[id(weight)] = (weight, weight._version, dtype, copy)
    return copy
