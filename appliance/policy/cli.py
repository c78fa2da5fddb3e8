"""``appliance scan FILE [--policy P] [--json]``: a dry run of the upload scan.

The command object :data:`scan_command` is registered on the main CLI group.
Exit status: 0 when the policy accepts the file, 1 when it rejects it, 2 when
the file or the policy is invalid (the message names the line or key).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from appliance.errors import ApplianceError
from appliance.policy.model import load_default_policy, load_policy
from appliance.policy.report import render_json, render_text, scan_file


@click.command("scan")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Policy file (YAML) [default: the shipped policies/default.yaml].",
)
@click.option("--json", "as_json", is_flag=True, help="Print findings, counts and decision as JSON.")
def scan_command(file: Path, policy_path: Path | None, as_json: bool) -> None:
    """Scan a JSONL fine-tune FILE for personal data and secrets, without uploading it.

    Prints what the policy would block, redact or allow, by entity type and line.
    Exits 0 if the file would be accepted, 1 if rejected, 2 on invalid input.
    """
    try:
        policy = load_policy(policy_path) if policy_path else load_default_policy()
        report = scan_file(file, policy)
    except ApplianceError as exc:
        where = f" ({exc.param})" if exc.param else ""
        click.echo(f"error{where}: {exc.message}", err=True)
        sys.exit(2)
    click.echo(render_json(report) if as_json else render_text(report))
    sys.exit(0 if report.decision.accepted else 1)
