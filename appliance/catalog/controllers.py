"""``/v1/models``: base models and the caller's projects' adapters (vLLM's shape: adapters carry `parent`)."""

from __future__ import annotations

from litestar import Controller, Request, delete, get
from litestar.di import NamedDependency
from litestar.params import FromPath

from appliance.catalog.schemas import ModelDeleted, ModelList, ModelObject
from appliance.catalog.service import AdapterView, CatalogService
from appliance.errors import MODEL_NAME_LIKE, NotFoundError, echo
from appliance.identity.roles import Permission
from appliance.web.context import audit_context


def _adapter_object(v: AdapterView) -> ModelObject:
    return ModelObject(id=v.row.id, created=int(v.row.created_at.timestamp()), owned_by=v.project,
                       parent=v.row.base_model, root=v.row.base_model, kind=v.row.kind,
                       manifest=v.row.manifest)


class ModelController(Controller):
    path = "/v1/models"
    tags = ["models"]

    @get(opt={"permission": Permission.MODELS_READ}, sync_to_thread=True)
    def list_models(self, request: Request, catalog: NamedDependency[CatalogService]) -> ModelList:
        """Base models, the caller's projects' adapters (with `parent`), and for global roles the
        adapters operators loaded at run time."""
        base = [ModelObject(id=m.name, created=int(m.created_at.timestamp()), owned_by="appliance", parent=None,
                            root=m.name, kind=m.kind, max_model_len=m.info.get("context_length"))
                for m in catalog.list_base_models()]
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
        m = catalog.get_base_model(model_id)
        return ModelObject(id=m.name, created=int(m.created_at.timestamp()), owned_by="appliance", parent=None,
                           root=m.name, kind=m.kind)

    @delete("/{model_id:str}", opt={"permission": Permission.MODELS_MANAGE}, status_code=200, sync_to_thread=True)
    def delete_model(self, request: Request, catalog: NamedDependency[CatalogService],
                     model_id: FromPath[str]) -> ModelDeleted:
        """Delete a fine-tuned model: unloaded from serving, its artefact crypto-shredded."""
        if not model_id.startswith("ft:"):
            raise NotFoundError(f"fine-tuned model {echo(model_id, MODEL_NAME_LIKE)} not found; base models are removed by an admin "
                                "on the host", param="model")
        catalog.delete_adapter(request.user, audit_context(request), model_id)
        return ModelDeleted(id=model_id)
