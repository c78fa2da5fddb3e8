"""The job page's progress: training steps, then the post-training phase under way."""

from __future__ import annotations

from appliance.jobs.models import JobEvent
from appliance.jobs.service import Phase
from appliance.portal.jobs import _progress


def _metrics(step: int, **data) -> JobEvent:
    return JobEvent(job_id="ftjob-x", type="metrics", message="", data={"step": step, "total_steps": 48, **data})


def test_the_phase_under_way_is_shown_with_its_time_left_and_dropped_when_it_ends():
    events = [_metrics(48, train_loss=1.5),
              _metrics(48, phase={"name": "canary exposure", "done": 1, "total": 4, "seconds_left": 200})]
    progress = _progress(events)
    assert (progress["step"], progress["total"], progress["percent"]) == (48, 48, 100)
    assert progress["phase"] == Phase("canary exposure", 1, 4, 200)
    assert progress["phase_left"] == "3 min"
    events.append(_metrics(48, phase={"name": "canary exposure", "done": 4, "total": 4, "seconds_left": 0}))
    assert _progress(events)["phase"] is None and _progress(events)["phase_left"] is None


def test_malformed_phase_data_is_ignored():
    for bad in ({"name": "x", "done": "1", "total": 4}, {"done": 1, "total": 4}, "canary", None,
                {"name": "x", "done": 5, "total": 4}):
        assert _progress([_metrics(3, phase=bad)])["phase"] is None
