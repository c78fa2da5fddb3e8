"""Bodies of the policy and glossary routes (``/api/v1/projects/{name}/policy`` and ``.../glossary``)."""

from __future__ import annotations

from typing import Any

import msgspec


class PolicyIn(msgspec.Struct, forbid_unknown_fields=True):
    #: The policy as YAML (or JSON) text.
    text: str


class PolicyOut(msgspec.Struct):
    project: str
    source: str
    #: Of what applies: the text's rules and allow list merged with the glossary.
    content_hash: str
    text: str
    #: The project's reviewed glossary (``GET .../glossary`` lists it): entries and content hash.
    glossary: dict[str, Any] | None = None
    object: str = "policy"


class GlossaryEntryOut(msgspec.Struct):
    id: str
    entity_type: str | None
    file_id: str | None
    added_by: str
    added_at: int
    #: Shown to those who may read file contents (``files:content``).
    value: str | None = None
    object: str = "glossary.entry"


class GlossaryOut(msgspec.Struct):
    project: str
    content_hash: str
    data: list[GlossaryEntryOut]
    added: int | None = None
    object: str = "glossary"


class GlossaryIn(msgspec.Struct, forbid_unknown_fields=True):
    #: Values to mark as not personal data for this project.
    values: list[str] = []
    #: With ``groups``: the file whose review names them.
    file_id: str | None = None
    #: Group ids from ``GET /v1/files/{file_id}/scan?group_by=value``.
    groups: list[str] = []
