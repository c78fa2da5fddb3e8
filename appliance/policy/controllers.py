"""HTTP routes of project policies (``/api/v1/projects/{name}/policy``) and glossaries (``.../glossary``)."""

from __future__ import annotations

from litestar import Controller, Request, delete, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from appliance.identity.roles import Permission, role_allows
from appliance.identity.service import IdentityService
from appliance.policy.glossary import Glossary
from appliance.policy.schemas import GlossaryEntryOut, GlossaryIn, GlossaryOut, PolicyIn, PolicyOut
from appliance.policy.service import EffectivePolicy, PolicyService
from appliance.web.context import audit_context
from appliance.web.openapi import error_responses


class PolicyController(Controller):
    path = "/api/v1/projects/{name:str}/policy"
    tags = ["policy"]

    @get(opt={"permission": Permission.PROJECTS_READ}, sync_to_thread=True)
    def get_policy(self, request: Request, identity: NamedDependency[IdentityService],
                   policies: NamedDependency[PolicyService], name: FromPath[str]) -> PolicyOut:
        """The policy that applies to the project's uploads (its own or the default)."""
        project = identity.get_project(request.user, name)
        return _policy_out(name, policies.describe(project))

    @put(opt={"permission": Permission.PROJECTS_MANAGE}, sync_to_thread=True)
    def set_policy(self, request: Request, identity: NamedDependency[IdentityService],
                   policies: NamedDependency[PolicyService], name: FromPath[str], data: JSONBody[PolicyIn]) -> PolicyOut:
        """Replace the project's policy; every error in it is reported at once."""
        project = identity.get_project(request.user, name)
        return _policy_out(name, policies.set(audit_context(request), project, data.text))


def _policy_out(project: str, eff: EffectivePolicy) -> PolicyOut:
    return PolicyOut(project=project, source=eff.source, content_hash=eff.policy.content_hash, text=eff.text,
                     glossary={"entries": len(eff.glossary.entries), "content_hash": eff.glossary.content_hash})


class GlossaryController(Controller):
    """A project's reviewed glossary: values marked as not personal data, merged into its policy's allow list."""

    path = "/api/v1/projects/{name:str}/glossary"
    tags = ["policy"]

    @get(opt={"permission": Permission.FILES_READ}, sync_to_thread=True)
    def list_glossary(self, request: Request, identity: NamedDependency[IdentityService],
                      policies: NamedDependency[PolicyService], name: FromPath[str]) -> GlossaryOut:
        """The glossary's entries; their values only for those who may read file contents."""
        project = identity.get_project(request.user, name)
        glossary = policies.describe(project).glossary
        return _glossary_out(name, glossary, role_allows(request.user.role, Permission.FILES_CONTENT))

    @post(opt={"permission": Permission.FILES_WRITE}, status_code=200, sync_to_thread=True,
          responses=error_responses(409))
    def add_to_glossary(self, request: Request, identity: NamedDependency[IdentityService],
                        policies: NamedDependency[PolicyService], name: FromPath[str],
                        data: JSONBody[GlossaryIn]) -> GlossaryOut:
        """Mark values as not personal data for this project: by text, or by group ids of a file's review.

        Audited with counts and the glossary's content hash, never the values.
        Applies to later uploads, re-scans (`POST /v1/files/{id}/scan`) and
        the output guard of the project's models.
        """
        project = identity.get_project(request.user, name)
        glossary, added = policies.add_to_glossary(request.user, audit_context(request), project, values=data.values,
                                                file_id=data.file_id, groups=data.groups)
        out = _glossary_out(name, glossary, True)
        out.added = added
        return out

    @delete("/{entry_id:str}", opt={"permission": Permission.FILES_WRITE}, status_code=200, sync_to_thread=True)
    def remove_from_glossary(self, request: Request, identity: NamedDependency[IdentityService],
                             policies: NamedDependency[PolicyService], name: FromPath[str],
                             entry_id: FromPath[str]) -> GlossaryOut:
        """Remove one entry; files already scanned keep their content until re-scanned."""
        project = identity.get_project(request.user, name)
        glossary = policies.remove_from_glossary(audit_context(request), project, entry_id)
        return _glossary_out(name, glossary, True)


def _glossary_out(project: str, glossary: Glossary, show_values: bool) -> GlossaryOut:
    return GlossaryOut(project=project, content_hash=glossary.content_hash, data=[
        GlossaryEntryOut(id=e.id, entity_type=e.entity_type, file_id=e.file_id, added_by=e.added_by,
                         added_at=e.added_at, value=e.value if show_values else None)
        for e in glossary.entries])
