"""Progress plumbing both training loops use: the window between ``train`` events, and JSON-ready records."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any


class AsDict:
    """Mixin for result and event dataclasses: ``to_dict()`` is :func:`dataclasses.asdict`."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


class ProgressWindow:
    """Training time of this call, and the losses and items (tokens, images) since the last ``train`` event.

    Time spent inside :meth:`paused` (checkpoints, validation) is neither training
    time nor part of a window's throughput.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self._window_start = self.started
        self._items = 0
        self._losses: list[float] = []

    def add(self, loss: float | None, items: int) -> None:
        """Count one step: its loss (``None``: a step without one) and the items it trained on."""
        if loss is not None:
            self._losses.append(loss)
        self._items += items

    def elapsed(self) -> float:
        """Seconds trained since this window was made, pauses excluded."""
        return time.perf_counter() - self.started

    def flush(self) -> tuple[float | None, float]:
        """``(mean loss or None, items per second)`` since the last flush; starts a new window."""
        now = time.perf_counter()
        loss = sum(self._losses) / len(self._losses) if self._losses else None
        rate = self._items / max(now - self._window_start, 1e-9)
        self._window_start, self._items, self._losses = now, 0, []
        return loss, rate

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside is not training time."""
        paused = time.perf_counter()
        try:
            yield
        finally:
            pause = time.perf_counter() - paused
            self.started += pause
            self._window_start += pause
