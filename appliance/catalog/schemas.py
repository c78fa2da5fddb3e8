"""Bodies of ``/v1/models``."""

from __future__ import annotations

from typing import Any

import msgspec


class ModelObject(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    parent: str | None
    root: str
    kind: str
    manifest: dict[str, Any] | None = None
    max_model_len: int | None = None
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelObject]
    object: str = "list"


class ModelDeleted(msgspec.Struct):
    id: str
    deleted: bool = True
    object: str = "model"
