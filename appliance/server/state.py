"""Builds what the running application holds (:class:`appliance.services.AppState`): settings, database and services."""

from __future__ import annotations

from dataclasses import replace

from appliance.catalog.service import CatalogService
from appliance.crypto.envelope import FileKeyProvider
from appliance.db.base import Database
from appliance.evaluations.runner import EvaluationRunner
from appliance.evaluations.service import EvaluationService, unfinished_evaluation_using
from appliance.files.service import FileService
from appliance.identity.auth import FailureLimiter
from appliance.jobs.planning import training_device
from appliance.identity.service import IdentityService
from appliance.jobs.executors import LocalExecutor, make_executor
from appliance.jobs.isolation import IsolationLevel
from appliance.jobs.scheduler import Scheduler, SchedulerSettings
from appliance.inference.service import InferenceService
from appliance.jobs.service import JobService, erase_job_results_with, unfinished_job_using
from appliance.identity.sessions import SessionService
from appliance.policy.glossary import GlossaryService
from appliance.policy.service import PolicyService
from appliance.retention import RetentionSweeper
from appliance.scanning import get_scanner
from appliance.services import AppState
from appliance.settings import Settings
from appliance.storage.blobs import BlobStore


def build_state(
    settings: Settings, db: Database | None = None, scheduler_settings: SchedulerSettings | None = None
) -> AppState:
    db = db or Database(
        settings.database_url, echo=settings.database.echo, busy_timeout_ms=settings.database.busy_timeout_ms
    )
    keys = FileKeyProvider(settings.key_file)
    blobs = BlobStore(settings.blobs_dir, keys)
    policies = PolicyService(db, settings.intake.default_policy, GlossaryService(db, blobs))
    catalog = CatalogService(db, blobs, settings.models_dir, settings.signing_key_file,
                             import_dir=settings.home.imports_dir)
    scheduler_settings = scheduler_settings or SchedulerSettings(
        lease_s=settings.jobs.lease_s, isolation=IsolationLevel(settings.jobs.worker_isolation))
    if scheduler_settings.executor is None:
        scheduler_settings = replace(scheduler_settings, executor=make_executor(
            settings.jobs, worker_module=scheduler_settings.worker_module, limits=scheduler_settings.limits,
            isolation=scheduler_settings.isolation, hide=(settings.home.home, settings.key_file)))
    files = FileService(db, blobs, get_scanner, policies, settings.intake)
    scheduler = Scheduler(db, files, catalog, scheduler_settings)
    policies.file_review = files.review_values
    files.on_delete.append(catalog.withdraw_trained_on)
    files.base_models = catalog.list_base_models  # the quality report counts tokens with their tokenizers
    files.users_of.append(unfinished_job_using)
    files.users_of.append(unfinished_evaluation_using)
    # Evaluations run one at a time in a sandboxed worker on this host, as a local training job's does.
    evaluation_runner = EvaluationRunner(db, files, catalog, LocalExecutor(
        "appliance.evaluations.worker", scheduler_settings.limits, scheduler_settings.isolation,
        hide=(settings.home.home, settings.key_file)), lease_s=settings.jobs.lease_s,
        busy=scheduler.holds_device)
    if scheduler.executor.name == "local":  # and training waits for a running evaluation (Ray's nodes are others)
        scheduler.busy = evaluation_runner.running
    evaluations = EvaluationService(db, catalog, files, wake=evaluation_runner.wake)
    # An evaluation's result file copies its test file's records and its fine-tunes' generations: it is
    # crypto-shredded in the transaction that shreds either (deletion, withdrawal, retention).
    files.on_shred.append(evaluations.erase_results_of_file)
    files.on_shred.append(erase_job_results_with(files))  # and a job's result files, the files it read
    catalog.on_shred.append(evaluations.erase_results_of_model)
    return AppState(
        settings=settings,
        db=db,
        identity=IdentityService(db),
        limiter=FailureLimiter(settings.auth.max_failures, settings.auth.failure_window_s),
        keys=keys,
        blobs=blobs,
        policies=policies,
        files=files,
        catalog=catalog,
        jobs=JobService(db, catalog, files, wake=scheduler.wake, executor=scheduler.executor,
                        training_device=lambda: training_device(settings.jobs.training_device_memory_gib)),
        scheduler=scheduler,
        sessions=SessionService(db, idle_minutes=settings.portal.session_idle_minutes,
                                max_hours=settings.portal.session_max_hours),
        inference=InferenceService(db, catalog, policies, lambda: files.scanner, settings.serving),
        retention=RetentionSweeper(db, policies, files, catalog, settings.retention.sweep_interval_s),
        evaluations=evaluations,
        evaluation_runner=evaluation_runner,
    )
