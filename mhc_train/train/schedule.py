"""Learning-rate schedule: linear warmup, then the mHC paper's step decay (Table 5).

The multiplier of the base learning rate for the update with 0-based index ``step``:

    warmup   step <  W:               (step + 1) / W        (the first update already moves)
    step     from round(0.8 T) on:    0.316                 (T = train.steps)
             from round(0.9 T) on:    0.1
    constant otherwise:               1

Table 5 prints "decay step ratio [0.8, 0.9]" and "decay rate [0.316, 0.1]". We read the rates
as multipliers of the *base* rate from each point on (0.316 ~ sqrt(0.1), so this equals two
x0.316 cuts: after the second one the rate is 0.1 x base, not 0.0316 x base), DeepSeek's
multi-step convention.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mhc_train.train.config import decay_step


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, schedule: str = "step",
                  decay_at: Sequence[float] = (0.8, 0.9), decay_factors: Sequence[float] = (0.316, 0.1)) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    factor = 1.0
    if schedule == "step":
        for at, f in zip(decay_at, decay_factors):
            if step >= decay_step(at, total_steps):
                factor = f
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                    schedule: str, decay_at: Sequence[float], decay_factors: Sequence[float]):
    """A ``LambdaLR`` whose ``step()`` is called once per optimizer step (skipped ones too)."""
    decay_at, decay_factors = tuple(decay_at), tuple(decay_factors)

    def fn(step: int) -> float:
        return lr_multiplier(step, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule,
                             decay_at=decay_at, decay_factors=decay_factors)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
