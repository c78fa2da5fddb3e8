"""``appliance init``, ``serve`` and ``settings``: setting up and running the appliance."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from appliance import __version__
from appliance.bootstrap import initialize, open_initialized
from appliance.cli.common import _ctx, _settings, handle_errors
from appliance.errors import InvalidRequestError
from appliance.logs import configure_logging
from appliance.settings import Settings, describe_settings


@click.command()
@handle_errors
def init() -> None:
    """Create $APPLIANCE_HOME, the master key, the database, the first admin and its token."""
    settings = _settings()
    result = initialize(settings, _ctx())
    if result.created:
        click.echo(f"Initialised {result.home}")
        click.echo(f"  master key:  {result.key_file} (mode 0600; back it up: without it nothing can be decrypted)")
        click.echo(f"  admin token: {result.admin_token_file} (mode 0600)")
    else:
        click.echo(f"Already initialised: {result.home} (admin token: {result.admin_token_file})")


@click.command()
@click.option("--host", default=None, help="Interface to bind [default: $APPLIANCE_HOST or 127.0.0.1].")
@click.option("--port", type=int, default=None,
              help="Port [default: $APPLIANCE_PORT or 8080; with --role serving, 8000].")
@click.option("--role", "role", type=click.Choice(["all", "control", "serving"]), default="all", show_default=True,
              help="all: control plane and serving in this process. control: API, portal, jobs and audit, with "
                   "chat served by the replicas in APPLIANCE_VLLM_URL. serving: one such replica.")
@click.option("--model", "model", default=None,
              help="With --role serving: the catalogue's base model to serve [default: the only LLM base model].")
@handle_errors
def serve(host: str | None, port: int | None, role: str, model: str | None) -> None:
    """Apply migrations and serve the API (and portal), or, with ``--role serving``, a serving replica.

    Larger deployments split the process: one or more ``--role serving``
    replicas (each a vLLM-protocol server over the embedded engine; a real
    vLLM server works the same) and ``--role control`` pointed at them with
    ``APPLIANCE_SERVING_ENGINE=vllm`` and ``APPLIANCE_VLLM_URL``; the control
    plane loads and unloads adapters on every replica and reconciles them.
    """
    import uvicorn

    settings = _settings()
    configure_logging(settings.log.level, settings.log.format, settings.home.logs_dir)
    if model is not None and role != "serving":
        raise InvalidRequestError("`--model` applies to `--role serving` only", param="--model")
    if role == "control" and settings.serving.engine != "vllm":
        raise InvalidRequestError(
            f"`--role control` leaves chat to serving replicas, but APPLIANCE_SERVING_ENGINE is "
            f"{settings.serving.engine!r}; set APPLIANCE_SERVING_ENGINE=vllm and APPLIANCE_VLLM_URL to the replicas "
            "(`appliance serve --role serving` or vLLM servers)", param="--role")
    db = open_initialized(settings)
    if role == "serving":
        _serve_replica(settings, db, model, host or settings.server.host, port or 8000)
        return
    from appliance.server.app import create_app
    from appliance.server.state import build_state

    state = build_state(settings, db)
    state.blobs.sweep_temporaries()  # ciphertext left by writes a crash interrupted
    app = create_app(settings, state)
    host = host or settings.server.host
    port = port or settings.server.port
    shown_host = f"[{host}]" if ":" in host else host
    click.echo(f"Appliance {__version__} listening on http://{shown_host}:{port}"
               + (f" (control plane; serving replicas: {settings.serving.vllm_url})"
                  if role == "control" else ""))
    click.echo(f"  Portal:      http://{shown_host}:{port}/")
    click.echo(f"  API:         http://{shown_host}:{port}/v1  (OpenAPI: /schema/openapi.json)")
    click.echo(f"  Admin token: {settings.home.admin_token_file}")
    sys.stdout.flush()
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, server_header=False)


def _serve_replica(settings: Settings, db: Any, model: str | None, host: str, port: int) -> None:
    """``serve --role serving``: the catalogue's base model behind vLLM's protocol (see ``serve-engine``)."""
    import uvicorn

    from appliance.catalog.service import CatalogService
    from serving.registry import EngineSpec, create_engine
    from serving.vllm_server import create_vllm_compatible_app

    with db.read() as s:
        bases = [b for b in CatalogService.base_models_in(s) if b.kind == "llm"]
    names = ", ".join(b.name for b in bases) or "none imported"
    if model is None and len(bases) != 1:
        raise InvalidRequestError(f"name the base model to serve with `--model`; LLM base models: {names}",
                                  param="--model")
    base = bases[0] if model is None else next((b for b in bases if b.name == model), None)
    if base is None:
        raise InvalidRequestError(f"`--model` {model!r} is not an LLM base model of the catalogue; "
                                  f"LLM base models: {names}", param="--model")
    key_file = settings.serving.vllm_api_key_file
    api_key = key_file.read_text().strip() if key_file else None
    engine = create_engine("transformers", EngineSpec(
        Path(base.path), name=base.name, device=None if settings.serving.device == "auto" else settings.serving.device,
        max_resident_adapters=settings.serving.max_resident_adapters))
    app = create_vllm_compatible_app(engine, api_key=api_key)
    shown_host = f"[{host}]" if ":" in host else host
    click.echo(f"Appliance {__version__} serving replica: {base.name} (vLLM protocol) on http://{shown_host}:{port}")
    sys.stdout.flush()
    try:
        uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, server_header=False)
    finally:
        engine.close()


@click.command("settings")
def show_settings() -> None:
    """List every APPLIANCE_* variable with its default and meaning."""
    for name, default, help_ in describe_settings():
        click.echo(f"{name:<36} {default or '-':<12} {help_}")
