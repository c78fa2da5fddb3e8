"""Imports every table module so ``Base.metadata`` is complete (migrations, tests)."""

from appliance.audit.models import AuditCheckpoint, AuditEvent, AuditHead
from appliance.catalog.models import AdapterRecord, BaseModelRecord
from appliance.evaluations.models import Evaluation
from appliance.files.models import ScanFinding, StoredFile
from appliance.identity.models import ApiToken, PortalSession, Project, RoleBinding, User
from appliance.jobs.models import FineTuningJob, JobCheckpoint, JobEvent
from appliance.policy.models import ProjectGlossary, ProjectPolicy
from appliance.storage.models import DataKey

__all__ = [
    "AdapterRecord", "ApiToken", "AuditCheckpoint", "AuditEvent", "AuditHead", "BaseModelRecord", "DataKey", "Evaluation", "FineTuningJob",
    "JobCheckpoint", "JobEvent", "PortalSession", "Project", "ProjectGlossary", "ProjectPolicy", "RoleBinding", "ScanFinding", "StoredFile", "User",
]
