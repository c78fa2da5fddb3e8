"""Which policy applies to a project: its own, else the shipped default, plus its reviewed glossary."""

from __future__ import annotations

from typing import TYPE_CHECKING

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.audit.service import AuditContext, record
from appliance.db.base import Database, utcnow
from appliance.errors import ConflictError, InvalidRequestError
from appliance.identity.service import Principal
from appliance.policy.glossary import EMPTY, Glossary, GlossaryService, check_value
from appliance.policy.model import (
    DEFAULT_POLICY_PATH,
    Policy,
    default_policy_text,
    load_default_policy,
    load_policy,
    parse_policy,
)
from appliance.policy.models import ProjectPolicy

if TYPE_CHECKING:
    from appliance.identity.models import Project

#: ``(principal, project, file_id, groups) -> [(value, entity_type)]``: checks that ``file_id`` is a file of
#: ``project`` that the principal may read, and reads the values of the named groups of its review (raising
#: the errors to report). The file service provides it (:attr:`PolicyService.file_review`): files depend on
#: policy, not the other way round.
FileReview = Callable[[Principal, "Project", str, list[str]], list[tuple[str, str | None]]]


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
        if default_path is None:  # the shipped one, read as package data
            self.default_text, self.default = default_policy_text(), load_default_policy()
        else:
            self.default_text, self.default = default_path.read_text(), load_policy(default_path)
        #: Reads the groups of a file's review for :meth:`add_to_glossary` (set when the file service is built).
        self.file_review: FileReview | None = None

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

    def add_to_glossary(self, principal: Principal, ctx: AuditContext, project: Project, *,
                        values: list[str], file_id: str | None, groups: list[str]) -> tuple[Glossary, int]:
        """Mark values as not personal data for ``project``: given as text, or as groups of a file's review."""
        glossary = self.glossary
        if glossary is None:
            raise ConflictError("this appliance keeps no glossaries", param="values")
        if groups and not file_id:
            raise InvalidRequestError("`groups` name groups of a file's review: give `file_id` too", param="file_id")
        pairs: list[tuple[str, str | None]] = [(check_value(v, f"values[{i}]"), None) for i, v in enumerate(values)]
        if file_id:
            if self.file_review is None:
                raise ConflictError("this appliance keeps no files to review", param="file_id")
            pairs.extend(self.file_review(principal, project, file_id, groups))
        if not pairs:
            raise InvalidRequestError("give `values` or `groups` to add", param="values")
        return glossary.add(ctx, project, pairs, file_id=file_id)

    def remove_from_glossary(self, ctx: AuditContext, project: Project, entry_id: str) -> Glossary:
        if self.glossary is None:
            raise ConflictError("this appliance keeps no glossaries", param="entry_id")
        return self.glossary.remove(ctx, project, entry_id)
