"""The exceptions the trainer turns into one line on stderr and a non-zero exit code."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad key, value or combination; the message starts with the dotted key at fault."""

    exit_code = 2
    prefix = "config error"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: incompatible with the config, or unreadable."""

    exit_code = 2
    prefix = "checkpoint error"


class CheckpointUnusable(CheckpointError):
    """A checkpoint that fails verification or loading (damaged files, non-finite tensors): resume
    skips it for the next older one."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); the partial one is removed."""

    exit_code = 4
    prefix = "write error"


class RunDirInUse(RuntimeError):
    """Another process holds the run directory's lock."""

    exit_code = 2
    prefix = "run directory in use"


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite updates)."""

    exit_code = 3
    prefix = "training stopped"


class Interrupted(RuntimeError):
    """A signal (SIGTERM from a scheduler, Ctrl-C) stopped the run after a checkpoint."""

    exit_code = 130
    prefix = "interrupted"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
