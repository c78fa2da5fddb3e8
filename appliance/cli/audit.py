"""``appliance audit``: verify, report on and checkpoint the audit log (see ``appliance.audit``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from appliance.audit.service import record_verification, verify_chain
from appliance.bootstrap import open_initialized
from appliance.cli.common import _ctx, _settings, handle_errors


@click.group()
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


@audit.command("report")
@click.option("--from", "since", required=True, help="Start (inclusive), e.g. 2026-11-01.")
@click.option("--to", "until", required=True, help="End (exclusive), e.g. 2026-12-01.")
@click.option("--format", "fmt", type=click.Choice(["html", "pdf", "json", "csv"]), default="html")
@click.option("--project", default=None, help="Only this project [default: all].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write here instead of stdout.")
@handle_errors
def audit_report(since: str, until: str, fmt: str, project: str | None, out: Path | None) -> None:
    """A compliance report: datasets, PII, models and lineage, usage, denials, key rotations, deletions."""
    from appliance.auditor.reports import ReportScope, parse_when, produce

    db = open_initialized(_settings())
    body = produce(db, _ctx(), ReportScope(parse_when(since, "--from"), parse_when(until, "--to"), project), fmt)
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
