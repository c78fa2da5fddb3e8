"""Which policy applies to a project: its own, else the shipped default, plus its reviewed glossary."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from appliance.audit.service import AuditContext, record
from appliance.db.base import Database, utcnow
from appliance.files.glossary import EMPTY, Glossary, GlossaryService
from appliance.files.models import ProjectPolicy
from appliance.identity.models import Project
from appliance.policy import DEFAULT_POLICY_PATH, Policy, load_policy, parse_policy

@dataclass(frozen=True)
class EffectivePolicy:
    """A project's policy as served by the API."""

    #: What applies: the policy text's rules and allow list, plus the glossary's values.
    policy: Policy
    source: str  # "project" or "default"
    text: str
    glossary: Glossary = EMPTY


class PolicyService:
    """Resolves, validates and stores per-project policies.

    Args:
        db: The database.
        default_path: The default policy file (``APPLIANCE_DEFAULT_POLICY``), else the shipped one.
        glossary: The projects' reviewed glossaries, merged into their allow lists (none without it).
    """

    def __init__(self, db: Database, default_path: Path | None = None,
                 glossary: GlossaryService | None = None) -> None:
        self.db = db
        self.glossary = glossary
        self.default_path = default_path or DEFAULT_POLICY_PATH
        self.default_text = self.default_path.read_text()
        self.default = load_policy(self.default_path)

    def describe(self, project: Project) -> EffectivePolicy:
        with self.db.read() as s:
            row = s.get(ProjectPolicy, project.id)
        own = self._own(row)
        glossary = self.glossary.get(project) if self.glossary is not None else EMPTY
        return EffectivePolicy(own.policy.with_allowed(glossary.values), own.source, own.text, glossary)

    def _own(self, row: ProjectPolicy | None) -> EffectivePolicy:
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
        return self.describe(project)
