"""Time keeping of the GPU check: progress lines with the elapsed time, each section's allowance
(an estimate that repeats are fitted to, and a hard cap), and the cap's enforcement.

A section is given its estimate and its cap. Timed loops ask ``Allowance.repeats`` how many runs
still fit in the estimate: when a machine is slower than planned, repeats shrink (down to a
floor) instead of sections being dropped. The cap is the backstop for what cannot be fitted (a
compile that hangs): ``hard_cap`` raises ``SectionTimeout`` in the main thread when it passes.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from typing import Iterator


class SectionTimeout(BaseException):
    """A section (or a part of one) ran past its cap; ``cap`` is the ``Cap`` that expired.

    A ``BaseException``, as ``KeyboardInterrupt`` (and asyncio's ``CancelledError``, for the same
    reason): the ``except Exception`` that records one kernel's failure and goes on to the next,
    in this package or in the code it calls (``backend.self_test``, dynamo, Triton), must not
    swallow it and let the rest of the section run uncapped. Who means to stop at a cap catches
    it by name (``run_section``, ``gpu_step``).
    """

    def __init__(self, message: str, cap: "Cap | None" = None) -> None:
        super().__init__(message)
        self.cap = cap


class Cap:
    """What ``hard_cap`` yields: tells its own expiry from an enclosing cap's."""

    def owns(self, exc: BaseException) -> bool:
        return isinstance(exc, SectionTimeout) and exc.cap is self


class Clock:
    """Seconds since the check started; every progress line carries them."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)


class Allowance:
    """One section's time: ``estimate_s`` to fit repeats into, ``cap_s`` after which it stops."""

    def __init__(self, clock: Clock, estimate_s: float, cap_s: float) -> None:
        self.clock = clock
        self.estimate_s = estimate_s
        self.cap_s = cap_s
        self.started = clock.elapsed()

    def used(self) -> float:
        return self.clock.elapsed() - self.started

    def left(self) -> float:
        """Seconds of the estimate not yet used (never negative)."""
        return max(0.0, self.estimate_s - self.used())

    def repeats(self, seconds_per_run: float, items_left: int, most: int, least: int = 1) -> int:
        """Timed runs for the next item: its share of the estimate that is left, divided by what
        one run takes, between ``least`` and ``most``."""
        share = self.left() / max(1, items_left)
        fit = math.floor(share / max(seconds_per_run, 1e-6))
        return max(least, min(most, fit))


@contextlib.contextmanager
def hard_cap(seconds: float) -> Iterator[Cap]:
    """Raise ``SectionTimeout`` in the main thread once ``seconds`` have passed (SIGALRM).

    Python code is interrupted at the next bytecode; a long call into C (a kernel launch, a
    compile step) at its return. Caps nest: an inner one that would end after the enclosing one is
    not set, and the enclosing one is re-armed when an inner one ends; code that catches its own
    cap's expiry lets an enclosing one's pass (``Cap.owns``). Outside the main thread, or without
    SIGALRM, nothing is capped.
    """
    cap = Cap()
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    outer_left = signal.getitimer(signal.ITIMER_REAL)[0] if usable else 0.0
    if not usable or seconds <= 0 or 0 < outer_left <= seconds:  # an enclosing cap comes first
        yield cap
        return

    def expire(signum, frame):
        raise SectionTimeout(f"over its cap of {seconds:.0f} s", cap)

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield cap
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left > 0:  # re-arm the enclosing cap with what is left of it (at once if nothing)
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3))
