"""tests/timing.py: deadlines that stretch with the machine's load instead of failing under it."""

from __future__ import annotations

import time

import pytest

from tests import timing

pytestmark = pytest.mark.no_database


def test_slowness_follows_the_load_per_core(monkeypatch):
    monkeypatch.delenv("APPLIANCE_TEST_SLOWNESS", raising=False)
    monkeypatch.setattr(timing.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (5.0, 4.0, 3.0))
    assert timing.slowness() == 2.5
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (0.3, 0.1, 0.1))
    assert timing.slowness() == 1.0  # an idle machine never shortens a deadline
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (400.0, 0.0, 0.0))
    assert timing.slowness() == timing.MAX_SLOWNESS  # a hung process still fails


def test_the_environment_sets_a_floor(monkeypatch):
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("APPLIANCE_TEST_SLOWNESS", "3")
    assert timing.slowness() == 3.0 and timing.scaled(10) == 30.0 and timing.ms(1) == 3000.0
    monkeypatch.setenv("APPLIANCE_TEST_SLOWNESS", "fast")
    assert timing.slowness() == 1.0


def test_a_deadline_stretches_when_the_load_rises_while_it_runs(monkeypatch):
    load = [0.0]
    monkeypatch.delenv("APPLIANCE_TEST_SLOWNESS", raising=False)
    monkeypatch.setattr(timing.os, "cpu_count", lambda: 1)
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (load[0], 0.0, 0.0))
    deadline = timing.Deadline(0.05)
    assert deadline and deadline.remaining() > 0
    time.sleep(0.07)
    load[0] = 4.0  # the machine got busy: the same deadline now allows 0.2 s
    assert deadline and not deadline.expired()
    load[0] = 0.0  # ...and keeps the worst factor seen, even when the load drops again
    assert deadline.budget == pytest.approx(0.2)
    time.sleep(0.15)
    assert not deadline and deadline.remaining() == 0.0
    assert "x4.0" in str(deadline)
