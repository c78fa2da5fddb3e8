"""``appliance retention``: enforcing the retention periods of project policies (see ``appliance.retention``)."""

from __future__ import annotations

import sys

import click

from appliance.bootstrap import open_initialized
from appliance.cli.common import _settings, handle_errors


@click.group()
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
