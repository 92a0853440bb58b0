"""The trainer: Hydra app (``mhc-train``), loop, optimizer and schedule, checkpoints, metrics, plots.

Dependency direction: train -> model -> residual; data and config at the bottom.
"""

from mhc_train.train.config import RunConfig, TrainConfig, validate
from mhc_train.train.errors import CheckpointError, ConfigError, Interrupted, TrainingStopped

__all__ = ["CheckpointError", "ConfigError", "Interrupted", "RunConfig", "TrainConfig", "TrainingStopped", "validate"]
