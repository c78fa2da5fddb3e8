"""Models: base models and adapters with their signed lineage manifests."""

from __future__ import annotations

import json
from typing import Any

from litestar import Request, get
from litestar.di import NamedDependency
from litestar.response import Template

from appliance.catalog.service import CatalogService
from appliance.identity.roles import Permission
from appliance.jobs.service import JobService
from appliance.portal.render import page, portal, session_of


METHOD_LABELS = {"lora": "LoRA", "qlora": "QLoRA", "dreambooth_lora": "DreamBooth+LoRA", "dreambooth": "DreamBooth"}


def card(model: Any, jobs: JobService) -> dict[str, Any]:
    """A base model's card: size, context, licence, and what its jobs would need on this appliance."""
    info = model.info or {}
    points, advice = jobs.starting_points(model.path, model.kind) if model.kind in ("llm", "diffusion") else ([], None)
    return {"model": model, "size_bytes": info.get("size_bytes"), "context_length": info.get("context_length"),
            "resolution": info.get("default_resolution"), "license": info.get("license"),
            "memory": [{**p, "label": METHOD_LABELS.get(p["method"], p["method"])} for p in points],
            "recommendation": advice}


@get("/models", opt=portal(Permission.MODELS_READ), include_in_schema=False, sync_to_thread=True)
def model_list(request: Request, catalog: NamedDependency[CatalogService], jobs: NamedDependency[JobService]) -> Template:
    adapters = catalog.list_adapters(session_of(request).principal)
    device = jobs.training_device()
    return page(request, "models.html", section="models", title="Models",
                base=[card(m, jobs) for m in catalog.list_base_models()],
                device=f"{device.name}, {device.free_bytes / 2**30:.0f} GiB",
                adapters=[(a, catalog.verify_manifest(a), json.dumps(a.row.manifest, indent=1, sort_keys=True))
                          for a in adapters])


ROUTES = [model_list]
