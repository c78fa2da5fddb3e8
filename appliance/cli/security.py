"""``appliance deps``: auditing the installed dependencies against advisories (see ``appliance.security``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from appliance.cli.common import _settings, handle_errors


@click.group()
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
