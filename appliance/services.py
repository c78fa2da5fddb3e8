"""The services every request may reach, as one typed record (``app.state.appliance``).

Handlers that need several services take it as the ``appliance`` dependency. It is only a
type: :func:`appliance.server.state.build_state` builds it, where the app is wired together.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.catalog.service import CatalogService
from appliance.crypto.envelope import FileKeyProvider
from appliance.db.base import Database
from appliance.evaluations.runner import EvaluationRunner
from appliance.evaluations.service import EvaluationService
from appliance.policy.service import PolicyService
from appliance.files.service import FileService
from appliance.identity.auth import FailureLimiter
from appliance.identity.service import IdentityService
from appliance.identity.sessions import SessionService
from appliance.inference.service import InferenceService
from appliance.jobs.scheduler import Scheduler
from appliance.jobs.service import JobService
from appliance.retention import RetentionSweeper
from appliance.settings import Settings
from appliance.storage.blobs import BlobStore


@dataclass
class AppState:
    """Services shared by every request; built once by :func:`build_state`."""

    settings: Settings
    db: Database
    identity: IdentityService
    limiter: FailureLimiter
    keys: FileKeyProvider
    blobs: BlobStore
    policies: PolicyService
    files: FileService
    catalog: CatalogService
    jobs: JobService
    scheduler: Scheduler
    sessions: SessionService
    inference: InferenceService
    retention: RetentionSweeper
    evaluations: EvaluationService
    evaluation_runner: EvaluationRunner
