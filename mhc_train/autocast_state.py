"""Autocast is thread-local and scoped: code that runs later or elsewhere than the forward it
belongs to (a recomputation in backward, a pipeline chunk in a worker thread) must re-enter the
forward's autocast state explicitly."""

from __future__ import annotations

import contextlib

import torch

DEVICE_TYPES = ("cuda", "cpu")


def autocast_state() -> list[tuple[str, torch.dtype]]:
    """The (device type, dtype) of every autocast region active here."""
    return [(d, torch.get_autocast_dtype(d)) for d in DEVICE_TYPES if torch.is_autocast_enabled(d)]


@contextlib.contextmanager
def autocast_context(state: list[tuple[str, torch.dtype]]):
    """Re-enter ``state`` (from ``autocast_state``), and only it: autocast off on the other devices."""
    active = dict(state)
    with contextlib.ExitStack() as stack:
        for device_type in DEVICE_TYPES:
            if device_type in active:
                stack.enter_context(torch.autocast(device_type, dtype=active[device_type]))
            elif torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield
