"""A differentially private LoRA job end to end: the spent epsilon reaches the signed adapter manifest."""

from __future__ import annotations

from tests.integration.test_jobs import api_for, hp, owner, qa, tiny_model, trainer, upload, wait_for  # noqa: F401


def test_dp_lora_job_reports_the_spent_epsilon_in_the_manifest(client, state, tiny_model, trainer, owner):
    train_id = upload(client, owner, [qa(i) for i in range(24)])
    api = api_for(client, trainer)
    job = api.fine_tuning.jobs.create(
        model=tiny_model, training_file=train_id,
        method={"type": "lora", "lora": {"hyperparameters": hp(dp={"epsilon": 4, "max_grad_norm": 0.5})}},
    )
    job = wait_for(api, job.id)
    assert job.status == "succeeded", job.error
    shown = job.method.model_extra["lora"]["hyperparameters"]["dp"]
    assert shown == {"epsilon": 4, "delta": 1e-5, "max_grad_norm": 0.5}  # "auto" delta resolved
    messages = [e.message for e in api.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith("Differential privacy on (DP-SGD, Opacus): noise multiplier") for m in messages), messages

    model = next(m for m in api.models.list().data if m.id == job.fine_tuned_model)
    dp = model.model_extra["manifest"]["privacy"]["dp"]
    assert 0 < dp["epsilon_spent"] <= dp["epsilon_target"] == 4
    assert dp["delta"] == 1e-5 and dp["max_grad_norm"] == 0.5 and dp["accountant"] == "rdp"
    assert dp["steps"] == job.model_extra["metrics"]["total_steps"] and dp["noise_multiplier"] > 0
    assert state.catalog.verify_manifest(state.catalog.get_adapter(None, job.fine_tuned_model))
