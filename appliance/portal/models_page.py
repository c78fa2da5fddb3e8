"""Models: base models and adapters with their signed lineage manifests."""

from __future__ import annotations

import json

from litestar import Request, get
from litestar.di import NamedDependency
from litestar.response import Template

from appliance.catalog.service import CatalogService
from appliance.identity.roles import Permission
from appliance.portal.render import page, portal, session_of


@get("/models", opt=portal(Permission.MODELS_READ), include_in_schema=False, sync_to_thread=True)
def model_list(request: Request, catalog: NamedDependency[CatalogService]) -> Template:
    adapters = catalog.list_adapters(session_of(request).principal)
    return page(request, "models.html", section="models", title="Models", base=catalog.list_base_models(),
                adapters=[(a, catalog.verify_manifest(a), json.dumps(a.row.manifest, indent=1, sort_keys=True))
                          for a in adapters])


ROUTES = [model_list]
