"""``create_app()``: the Litestar application factory."""

from __future__ import annotations

from pathlib import Path

from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.routes import HTTPRoute
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig
from litestar.plugins.jinja import JinjaTemplateEngine

from appliance.auditor.controllers import AuditController, AuditProofController, AuditReportController
from appliance.identity.auth import PUBLIC_OPT, BearerAuthMiddleware, csrf_guard, permission_guard
from appliance.catalog.controllers import ModelController, ModelImportController
from appliance.evaluations.controllers import EvaluationController
from appliance.files.controllers import FileController, RejectedUploadController
from appliance.identity.controllers import MeController, ProjectController, TokenController, UserController
from appliance.inference.controllers import ImageController, InferenceController, RuntimeLoraController
from appliance.jobs.controllers import JobController
from appliance.policy.controllers import GlossaryController, PolicyController
from appliance.portal import admin as portal_admin
from appliance.portal import audit_page, auth_routes, datasets, evaluations_page, models_page, playground
from appliance.portal import jobs as portal_jobs
from appliance.server.context import (
    ApplianceRequest,
    RequestContextMiddleware,
    check_json_body,
    stamp_and_log_response,
)
from appliance.server.errors import EXCEPTION_HANDLERS
from appliance.server.health import health
from appliance.web.openapi import document_errors, openapi_config
from appliance.server.state import build_state
from appliance.services import AppState
from appliance.settings import Settings, get_settings

ROUTE_HANDLERS = [
    health, MeController, ProjectController, UserController, TokenController, AuditController, AuditProofController,
    AuditReportController, FileController, RejectedUploadController,
    PolicyController, GlossaryController, ModelController, ModelImportController, JobController, InferenceController, RuntimeLoraController,
    ImageController, EvaluationController,
]
PORTAL_DIR = Path(__file__).resolve().parent.parent / "portal"
PORTAL_ROUTES = [
    *auth_routes.ROUTES, *datasets.ROUTES, *portal_jobs.ROUTES, *evaluations_page.ROUTES, *models_page.ROUTES, *audit_page.ROUTES,
    *portal_admin.ROUTES, *playground.ROUTES,
]


def create_app(
    settings: Settings | None = None, state: AppState | None = None, *, run_scheduler: bool = True
) -> Litestar:
    """Build the application: routes, auth, error mapping, OpenAPI at ``/schema/openapi.json``.

    Args:
        settings: Settings to use; read from the environment when omitted.
        state: Prebuilt services (tests share one with direct database checks).
        run_scheduler: Run the background services in this process (on start-up): the job
            scheduler, the audit checkpoint timer and the retention sweeper.
    """
    settings = settings or get_settings()
    state = state or build_state(settings)

    from appliance.audit.checkpoints import CheckpointTimer

    from appliance.inference.service import ServingReconciler

    checkpoints = CheckpointTimer(state.db, state.catalog.signing_key, settings.audit.checkpoint_interval_s)
    reconciler = ServingReconciler(state.inference, settings.serving.reconcile_s)

    def _on_startup() -> None:
        if run_scheduler:
            state.scheduler.start()
            checkpoints.start()
            state.retention.start()
            state.evaluation_runner.start()
        reconciler.start()

    def _on_shutdown() -> None:
        reconciler.stop()
        if run_scheduler:
            state.evaluation_runner.stop()
            state.retention.stop()
            checkpoints.stop()
            state.scheduler.stop()
        state.inference.close()
        state.db.dispose()

    static = create_static_files_router(path="/static", directories=[PORTAL_DIR / "static"],
                                        opt={PUBLIC_OPT: True}, include_in_schema=False)
    app = Litestar(
        # One Router for the portal: registering handlers that share a path one by one
        # makes Litestar wrap earlier sync handlers again (they then return coroutines).
        route_handlers=[*ROUTE_HANDLERS, Router(path="/", route_handlers=PORTAL_ROUTES), static],
        template_config=TemplateConfig(directory=PORTAL_DIR / "templates", engine=JinjaTemplateEngine),
        middleware=[
            RequestContextMiddleware,
            DefineMiddleware(BearerAuthMiddleware, exclude_from_auth_key=PUBLIC_OPT, exclude_http_methods=()),
        ],
        guards=[permission_guard, csrf_guard],
        before_request=check_json_body,
        before_send=[stamp_and_log_response],
        dependencies={
            "appliance": Provide(lambda: state, sync_to_thread=False),
            "identity": Provide(lambda: state.identity, sync_to_thread=False),
            "files": Provide(lambda: state.files, sync_to_thread=False),
            "policies": Provide(lambda: state.policies, sync_to_thread=False),
            "catalog": Provide(lambda: state.catalog, sync_to_thread=False),
            "jobs": Provide(lambda: state.jobs, sync_to_thread=False),
            "evaluations": Provide(lambda: state.evaluations, sync_to_thread=False),
            "inference": Provide(lambda: state.inference, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,
        openapi_config=openapi_config(),
        request_max_body_size=settings.server.max_request_bytes,
        request_class=ApplianceRequest,
        state=State({"appliance": state}),
        on_startup=[_on_startup],
        on_shutdown=[_on_shutdown],
        logging_config=None,  # appliance.logs configures logging, scrubbed and structured
        debug=False,
    )
    document_errors(app)
    _refresh_options_handlers(app)
    return app


def _refresh_options_handlers(app: Litestar) -> None:
    """Make each automatic ``OPTIONS`` answer list all of its path's methods.

    Litestar 2 builds a path's ``OPTIONS`` handler when the path's first handler is
    registered and keeps it when more are added, so its ``Allow`` header named only
    some methods (litestar-org/litestar#4169, fixed in Litestar 3 only). The handler
    reads the methods of the route it closes over: point it at the final route.
    """
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        handler = route.route_handler_map.get("OPTIONS", (None,))[0]
        fn = getattr(handler, "fn", None)
        for cell in getattr(fn, "__closure__", None) or ():
            if getattr(fn, "__name__", "") == "options_handler" and isinstance(cell.cell_contents, HTTPRoute):
                cell.cell_contents = route

