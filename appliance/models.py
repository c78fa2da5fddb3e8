"""Imports every table module so ``Base.metadata`` is complete (migrations, tests)."""

from appliance.audit.models import AuditEvent, AuditHead
from appliance.identity.models import ApiToken, Project, RoleBinding, User

__all__ = ["ApiToken", "AuditEvent", "AuditHead", "Project", "RoleBinding", "User"]
