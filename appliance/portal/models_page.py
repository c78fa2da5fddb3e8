"""Models: base models and adapters with their signed lineage manifests."""

from __future__ import annotations

import json
from typing import Any

from litestar import Request, get
from litestar.di import NamedDependency
from litestar.response import Template

from appliance.catalog.service import CatalogService
from appliance.evaluations.service import EvaluationService, EvaluationView
from appliance.identity.roles import Permission, role_allows
from appliance.jobs.service import JobService
from appliance.portal.render import page, portal, session_of


METHOD_LABELS = {"lora": "LoRA", "qlora": "QLoRA", "dreambooth_lora": "DreamBooth+LoRA", "dreambooth": "DreamBooth"}


def card(model: Any, jobs: JobService, evaluation: EvaluationView | None = None) -> dict[str, Any]:
    """A base model's card: size, context, licence, what its jobs would need here, and its latest evaluation."""
    info = model.info or {}
    points, advice = jobs.starting_points(model.path, model.kind) if model.kind in ("llm", "diffusion") else ([], None)
    return {"model": model, "size_bytes": info.get("size_bytes"), "context_length": info.get("context_length"),
            "resolution": info.get("default_resolution"), "license": info.get("license"),
            "memory": [{**p, "label": METHOD_LABELS.get(p["method"], p["method"])} for p in points],
            "recommendation": advice, "evaluation": evaluation}


@get("/models", opt=portal(Permission.MODELS_READ), include_in_schema=False, sync_to_thread=True)
def model_list(request: Request, catalog: NamedDependency[CatalogService], jobs: NamedDependency[JobService],
               evaluations: NamedDependency[EvaluationService]) -> Template:
    principal = session_of(request).principal
    adapters = catalog.list_adapters(principal)
    device = jobs.training_device()
    # Evaluations are read with jobs (a consumer sees models, not their evaluations), in the viewer's projects.
    latest = evaluations.latest_by_base_model(principal) if role_allows(principal.role, Permission.JOBS_READ) else None
    return page(request, "models.html", section="models", title="Models", evaluated=latest is not None,
                base=[card(m, jobs, (latest or {}).get(m.name)) for m in catalog.list_base_models()],
                device=f"{device.name}, {device.free_bytes / 2**30:.0f} GiB",
                adapters=[(a, catalog.verify_manifest(a), json.dumps(a.row.manifest, indent=1, sort_keys=True))
                          for a in adapters])


ROUTES = [model_list]
