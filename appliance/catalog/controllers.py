"""``/v1/models``: base models and the caller's projects' adapters (vLLM's shape: adapters carry `parent`);
``/v1/model_imports``: admins import base models from the host's import directory and follow the import."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from appliance.catalog.imports import ModelImport
from appliance.catalog.schemas import (
    ModelDeleted,
    ModelImportCreate,
    ModelImportEvent,
    ModelImportList,
    ModelImportObject,
    ModelList,
    ModelObject,
)
from appliance.catalog.service import AdapterView, CatalogService
from appliance.errors import MODEL_NAME_LIKE, InvalidRequestError, NotFoundError, echo
from appliance.identity.roles import Permission
from appliance.web.context import audit_context
from appliance.web.openapi import error_responses
from serving.bodies import documented_body


def _adapter_object(v: AdapterView) -> ModelObject:
    return ModelObject(id=v.row.id, created=int(v.row.created_at.timestamp()), owned_by=v.project,
                       parent=v.row.base_model, root=v.row.base_model, kind=v.row.kind,
                       manifest=v.row.manifest)


def _base_object(m: Any) -> ModelObject:
    info = m.info or {}
    return ModelObject(id=m.name, created=int(m.created_at.timestamp()), owned_by="appliance", parent=None,
                       root=m.name, kind=m.kind, max_model_len=info.get("context_length"), license=info.get("license"),
                       parameters=m.parameters, size_bytes=info.get("size_bytes"))


class ModelController(Controller):
    path = "/v1/models"
    tags = ["models"]

    @get(opt={"permission": Permission.MODELS_READ}, sync_to_thread=True)
    def list_models(self, request: Request, catalog: NamedDependency[CatalogService]) -> ModelList:
        """Base models, the caller's projects' adapters (with `parent`), and for global roles the
        adapters operators loaded at run time."""
        base = [_base_object(m) for m in catalog.list_base_models()]
        data = base + [_adapter_object(a) for a in catalog.list_adapters(request.user)]
        if request.user.is_global:
            data += [ModelObject(id=name, created=0, owned_by="operator", parent=parent, root=name, kind="lora")
                     for name, parent in sorted(catalog.runtime_adapters().items())]
        return ModelList(data=data)

    @get("/{model_id:str}", opt={"permission": Permission.MODELS_READ}, sync_to_thread=True)
    def retrieve(self, request: Request, catalog: NamedDependency[CatalogService],
                 model_id: FromPath[str]) -> ModelObject:
        if model_id.startswith("ft:"):
            return _adapter_object(catalog.get_adapter(request.user, model_id))
        return _base_object(catalog.get_base_model(model_id, evaluators=True))

    @delete("/{model_id:str}", opt={"permission": Permission.MODELS_MANAGE}, status_code=200, sync_to_thread=True)
    def delete_model(self, request: Request, catalog: NamedDependency[CatalogService],
                     model_id: FromPath[str]) -> ModelDeleted:
        """Delete a fine-tuned model: unloaded from serving, its artefact crypto-shredded."""
        if not model_id.startswith("ft:"):
            raise NotFoundError(f"fine-tuned model {echo(model_id, MODEL_NAME_LIKE)} not found; base models are removed by an admin "
                                "on the host", param="model")
        catalog.delete_adapter(request.user, audit_context(request), model_id)
        return ModelDeleted(id=model_id)


def _import_object(task: ModelImport) -> ModelImportObject:
    return ModelImportObject(
        id=task.id, model=task.name, source=task.source, status=task.status, created_by=task.created_by,
        created_at=task.created_at, finished_at=task.finished_at, error=task.error,
        events=[ModelImportEvent(**e) for e in list(task.events)])


class ModelImportController(Controller):
    path = "/v1/model_imports"
    tags = ["models"]

    @post(opt={"permission": Permission.MODELS_IMPORT}, status_code=202, sync_to_thread=True,
          dto=documented_body(ModelImportCreate), return_dto=None, responses=error_responses(404, 409))
    def create(self, request: Request, catalog: NamedDependency[CatalogService],
               data: JSONBody[dict[str, Any]]) -> ModelImportObject:
        """Import a base model placed in the import directory (admin). Answers at once with the running
        import; follow it with `GET /v1/model_imports/{id}` (its `events` say each file copied and each check)."""
        if not isinstance(data, dict):
            raise InvalidRequestError(f"the body must be a JSON object; got {type(data).__name__}", param="body")
        unknown = sorted(set(data) - {"source", "model"})
        if unknown:
            raise InvalidRequestError(f"unknown field(s) {', '.join(map(repr, unknown[:5]))}; expected `source` "
                                      "and `model`", param=str(unknown[0])[:64])
        model = data.get("model")
        if not isinstance(model, str):
            raise InvalidRequestError(f"`model` must be the new base model's name (a string); got "
                                      f"{type(model).__name__}", param="model")
        task = catalog.imports.start(audit_context(request), data.get("source"), model)
        return _import_object(task)

    @get(opt={"permission": Permission.MODELS_IMPORT}, sync_to_thread=True)
    def list_imports(self, catalog: NamedDependency[CatalogService]) -> ModelImportList:
        """Imports since the server started, newest first."""
        return ModelImportList(data=[_import_object(t) for t in catalog.imports.list()])

    @get("/{import_id:str}", opt={"permission": Permission.MODELS_IMPORT}, sync_to_thread=True)
    def retrieve(self, catalog: NamedDependency[CatalogService], import_id: FromPath[str]) -> ModelImportObject:
        return _import_object(catalog.imports.get(import_id))
