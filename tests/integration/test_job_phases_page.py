"""A job after training, while canary exposure runs: the jobs list and the job page show the phase under way
with its time left (issue 23), then nothing once it ended. The job's rows and events are written as the
scheduler writes them; the pages are the portal's, read with a session."""

from __future__ import annotations

import re

from sqlalchemy import select

from appliance.identity.models import Project
from appliance.identity.roles import Role
from appliance.jobs.models import FineTuningJob
from appliance.jobs.service import add_event
from tests.integration.test_evaluations import portal_headers


def test_the_phase_under_way_shows_on_the_jobs_list_and_the_job_page(client, state, make_token):
    make_token("trish", Role.TRAINER, "acme")
    with state.db.transaction() as s:
        project = s.scalar(select(Project).where(Project.name == "acme"))
        s.add(FineTuningJob(id="ftjob-phases", project_id=project.id, created_by="trish", model="base",
                            training_file="file-x", seed=0, method_type="lora", status="running", attempts=1))
        s.flush()
        add_event(s, "ftjob-phases", "Step 48/48: training loss 1.2", type="metrics",
                  data={"step": 48, "total_steps": 48, "train_loss": 1.2})
        add_event(s, "ftjob-phases", "canary exposure: canary 1 of 4 (60 s, about 180 s left)", type="metrics",
                  data={"step": 48, "total_steps": 48, "phase": {"name": "canary exposure", "done": 1, "total": 4,
                                                                 "seconds_left": 180}})
    headers = portal_headers(state, "trish")
    listing = client.get("/jobs", headers=headers).text
    assert re.search(r'<progress max="4" value="1" aria-label="canary exposure: 1 of 4"></progress> '
                     r"canary exposure 1/4", listing), listing
    page = client.get("/jobs/ftjob-phases", headers=headers).text
    assert "· canary exposure: 1 of 4, about 3 min left" in page

    with state.db.transaction() as s:
        add_event(s, "ftjob-phases", "canary exposure: canary 4 of 4 (240 s)", type="metrics",
                  data={"step": 48, "total_steps": 48, "phase": {"name": "canary exposure", "done": 4, "total": 4,
                                                                 "seconds_left": 0}})
    assert "canary exposure 4/4" not in client.get("/jobs", headers=headers).text  # the steps' bar again
    assert 'aria-label="step 48 of 48"' in client.get("/jobs", headers=headers).text
    assert 'id="phase"' not in client.get("/jobs/ftjob-phases", headers=headers).text
