"""The portal's jobs list groups a hyperparameter search's trials under the search (issue 24): the search's row,
then its trials in trial order, indented, never interleaved with the jobs created while the search ran. Rows are
written as the scheduler and the search driver write them; the page is the portal's, read with a session."""

from __future__ import annotations

import re
from datetime import timedelta

from sqlalchemy import select

from appliance.db.base import utcnow
from appliance.identity.models import Project
from appliance.identity.roles import Role
from appliance.jobs.models import FineTuningJob
from appliance.jobs.search import parse_search, stored
from appliance.jobs.service import add_event
from appliance.training.hyperparameters import HYPERPARAMETERS
from tests.conftest import bearer
from tests.integration.test_evaluations import portal_headers


def test_a_search_s_trials_are_listed_under_it_in_trial_order(client, state, make_token):
    trainer = make_token("trish", Role.TRAINER, "acme")
    make_token("tom", Role.TRAINER, "other")
    spec = parse_search("lora", {"learning_rate": {"choice": [1e-4, 1e-3, 1e-2]}, "n_epochs": 2},
                        {"trials": 3, "max_seconds": 600, "sampler": "grid"},
                        lambda values: HYPERPARAMETERS["lora"](**values))
    t0 = utcnow() - timedelta(hours=1)
    with state.db.transaction() as s:
        acme = s.scalar(select(Project).where(Project.name == "acme")).id
        other = s.scalar(select(Project).where(Project.name == "other")).id

        def job(job_id: str, minutes: int, status: str, project: int = acme, **kw) -> None:
            s.add(FineTuningJob(id=job_id, project_id=project, created_by="trish", model="base", training_file="f",
                                seed=1, method_type="lora", status=status, created_at=t0 + timedelta(minutes=minutes),
                                started_at=t0 + timedelta(minutes=minutes), **kw))

        job("ftjob-before", 0, "succeeded", fine_tuned_model="ft:base:acme:before")
        job("ftjob-search", 1, "running", search={**stored(spec), "best_trial": None})
        # trials and other jobs made while the search runs: newer than the search, interleaved in time
        job("ftjob-t0", 2, "succeeded", search_id="ftjob-search", trial_number=0, fine_tuned_model="ft:base:acme:t0")
        job("ftjob-between", 3, "succeeded")
        job("ftjob-t2", 5, "running", search_id="ftjob-search", trial_number=2)
        job("ftjob-t1", 4, "cancelled", search_id="ftjob-search", trial_number=1)
        job("ftjob-after", 6, "queued")
        job("ftjob-elsewhere", 7, "succeeded", project=other)
        s.flush()
        add_event(s, "ftjob-t2", "Step 3/8: training loss 1.2", type="metrics", data={"step": 3, "total_steps": 8})

    page = client.get("/jobs", headers=portal_headers(state, "trish")).text
    table = page.split('<table id="jobs">')[1].split("</table>")[0]
    rows = re.findall(r'<tr( class="\w+")?>\s*<td>(?:<span class="muted">Trial (\d)</span> )?<a href="/jobs/([\w-]+)"',
                      table)
    assert [(cls.strip(), trial, job_id) for cls, trial, job_id in rows] == [
        ("", "", "ftjob-after"), ("", "", "ftjob-between"),
        ('class="search"', "", "ftjob-search"),
        ('class="trial"', "0", "ftjob-t0"), ('class="trial"', "1", "ftjob-t1"), ('class="trial"', "2", "ftjob-t2"),
        ("", "", "ftjob-before")], table
    search_row = table.split('<tr class="search">')[1].split("</tr>")[0]
    assert "hyperparameter search of 3 trials" in search_row
    assert 'aria-label="2 of 3 trials ended"></progress> 2/3 trials' in search_row  # t0 and t1 ended
    trial_row = table.split('<a href="/jobs/ftjob-t2">')[1].split("</tr>")[0]
    assert 'aria-label="step 3 of 8"' in trial_row  # a trial's own progress, as any job's
    assert "ftjob-elsewhere" not in page and "style=" not in table
    assert 'data-refresh="5000"' in page  # a running trial keeps the list live

    # once the search ended, its row names the best trial
    with state.db.transaction() as s:
        row = s.get(FineTuningJob, "ftjob-search")
        row.status, row.search = "succeeded", {**row.search, "best_trial": 0}
    page = client.get("/jobs", headers=portal_headers(state, "trish")).text
    assert "hyperparameter search of 3 trials, best: trial 0" in page
    # the API's list is OpenAI's: every job, trials included, newest first
    listed = [j["id"] for j in client.get("/v1/fine_tuning/jobs", headers=bearer(trainer)).json()["data"]]
    assert listed == ["ftjob-after", "ftjob-t2", "ftjob-t1", "ftjob-between", "ftjob-t0", "ftjob-search",
                      "ftjob-before"]
