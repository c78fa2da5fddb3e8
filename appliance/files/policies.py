"""Which policy applies to a project: its own, else the shipped default."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from appliance.audit.service import AuditContext, record
from appliance.db.base import Database, utcnow
from appliance.files.models import ProjectPolicy
from appliance.identity.models import Project
from appliance.policy import DEFAULT_POLICY_PATH, Policy, load_policy, parse_policy

@dataclass(frozen=True)
class EffectivePolicy:
    """A project's policy as served by the API."""

    policy: Policy
    source: str  # "project" or "default"
    text: str


class PolicyService:
    """Resolves, validates and stores per-project policies.

    Args:
        db: The database.
        default_path: The default policy file (``APPLIANCE_DEFAULT_POLICY``), else the shipped one.
    """

    def __init__(self, db: Database, default_path: Path | None = None) -> None:
        self.db = db
        self.default_path = default_path or DEFAULT_POLICY_PATH
        self.default_text = self.default_path.read_text()
        self.default = load_policy(self.default_path)

    def describe(self, project: Project) -> EffectivePolicy:
        with self.db.read() as s:
            row = s.get(ProjectPolicy, project.id)
        if row is None:
            return EffectivePolicy(self.default, "default", self.default_text)
        return EffectivePolicy(parse_policy(row.text), "project", row.text)

    def effective(self, project: Project) -> Policy:
        return self.describe(project).policy

    def set(self, ctx: AuditContext, project: Project, text: str) -> EffectivePolicy:
        """Validate (all errors at once) and store ``text`` as the project's policy."""
        policy = parse_policy(text)
        with self.db.transaction() as s:
            row = s.get(ProjectPolicy, project.id)
            previous = row.content_hash if row else self.default.content_hash
            if row is None:
                row = ProjectPolicy(project_id=project.id, text=text, content_hash=policy.content_hash,
                                    updated_by=ctx.actor)
                s.add(row)
            else:
                row.text, row.content_hash = text, policy.content_hash
                row.updated_by, row.updated_at = ctx.actor, utcnow()
            record(s, ctx, "policy.update", resource_type="policy", resource_id=project.name, project=project.name,
                   details={"policy_hash": policy.content_hash, "previous_hash": previous,
                            "text_sha256": hashlib.sha256(text.encode()).hexdigest()})
        return EffectivePolicy(policy, "project", text)
