"""``create_app()``: the Litestar application factory."""

from __future__ import annotations

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin

from appliance import __version__
from appliance.audit.controllers import AuditController
from appliance.identity.auth import PUBLIC_OPT, BearerAuthMiddleware, permission_guard
from appliance.identity.controllers import MeController, ProjectController, TokenController, UserController
from appliance.server.context import RequestContextMiddleware, stamp_and_log_response
from appliance.server.errors import EXCEPTION_HANDLERS
from appliance.server.health import health
from appliance.server.state import AppState, build_state
from appliance.settings import Settings, get_settings

ROUTE_HANDLERS = [health, MeController, ProjectController, UserController, TokenController, AuditController]


def create_app(settings: Settings | None = None, state: AppState | None = None) -> Litestar:
    """Build the application: routes, auth, error mapping, OpenAPI at ``/schema/openapi.json``.

    Args:
        settings: Settings to use; read from the environment when omitted.
        state: Prebuilt services (tests share one with direct database checks).
    """
    settings = settings or get_settings()
    state = state or build_state(settings)

    def _on_shutdown() -> None:
        state.db.dispose()

    return Litestar(
        route_handlers=ROUTE_HANDLERS,
        middleware=[
            RequestContextMiddleware,
            DefineMiddleware(BearerAuthMiddleware, exclude_from_auth_key=PUBLIC_OPT, exclude_http_methods=()),
        ],
        guards=[permission_guard],
        before_send=[stamp_and_log_response],
        dependencies={
            "appliance": Provide(lambda: state, sync_to_thread=False),
            "identity": Provide(lambda: state.identity, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,
        openapi_config=OpenAPIConfig(
            title="Appliance API", version=__version__, path="/schema",
            description="On-prem fine-tuning appliance: OpenAI-compatible files, fine-tuning, models and chat.",
            # JSON only: the HTML explorers load scripts from CDNs, which an
            # air-gapped appliance must not reference.
            render_plugins=[JsonRenderPlugin()],
        ),
        request_max_body_size=settings.server.max_request_bytes,
        state=State({"appliance": state}),
        on_shutdown=[_on_shutdown],
        logging_config=None,  # appliance.logs configures logging, scrubbed and structured
        debug=False,
    )

