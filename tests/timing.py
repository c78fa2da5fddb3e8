"""Wall-clock deadlines that stretch on a loaded machine.

A test that waits for a real process (a server starting, a worker noticing its
server died, a job finishing) needs a deadline, but a fixed number of seconds
measures the machine as much as the code: on two cores with a load average of
5 everything takes two or three times as long. Every such deadline in the
suite is a :class:`Deadline`, whose budget is multiplied by :func:`slowness`,
the worst seen while it runs:

- ``APPLIANCE_TEST_SLOWNESS`` (a float, at least 1) when set: a floor for slow
  hosts (CI under other work, valgrind, a debugger);
- otherwise, and never below that floor, the load average per core (1-minute),
  capped at :data:`MAX_SLOWNESS` so that a hung process still fails.

Deadlines guard against hangs; none of them is a speed target (those live in
``bench/``).
"""

from __future__ import annotations

import os
import time

#: A deadline never stretches beyond this many times its budget.
MAX_SLOWNESS = 6.0


def slowness() -> float:
    """How many times slower than an idle machine this one runs now (1.0 at best)."""
    try:
        floor = max(1.0, float(os.environ.get("APPLIANCE_TEST_SLOWNESS", "1")))
    except ValueError:
        floor = 1.0
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        load = 0.0
    return min(MAX_SLOWNESS, max(floor, load))


def scaled(seconds: float) -> float:
    """``seconds`` stretched by the current :func:`slowness` (for a subprocess or socket timeout)."""
    return seconds * slowness()


class Deadline:
    """A budget of ``seconds`` on an idle machine, stretched by the worst :func:`slowness` seen since it started."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()
        self.factor = slowness()

    @property
    def budget(self) -> float:
        """The stretched budget so far, in seconds."""
        self.factor = max(self.factor, slowness())
        return self.seconds * self.factor

    def expired(self) -> bool:
        return time.monotonic() - self.started > self.budget

    def __bool__(self) -> bool:  # ``while deadline:`` reads as "while there is time left"
        return not self.expired()

    def remaining(self) -> float:
        """Seconds left of the stretched budget (at least 0)."""
        return max(0.0, self.budget - (time.monotonic() - self.started))

    def __str__(self) -> str:
        return f"{self.seconds:g}s (x{self.factor:.1f} for load: {self.seconds * self.factor:.0f}s)"


def ms(seconds: float) -> float:
    """:func:`scaled` in milliseconds (Playwright's timeouts)."""
    return scaled(seconds) * 1000
