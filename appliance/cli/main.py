"""The ``appliance`` command line.

Every command reads the same ``APPLIANCE_*`` settings as the server. Domain
errors print ``error: <message>`` on stderr and exit with status 2; a broken
audit chain exits with status 1.

This module holds only the root group; the commands live in one module per
area, like the server's controllers: ``server`` (init, serve, settings),
``identity`` (projects, users, tokens), ``audit``, ``keys``, ``retention``,
``catalog`` (models, adapters) and ``security`` (deps), with the helpers they
share in ``common``. They never import this module; it adds their commands.
"""

from __future__ import annotations

import os

import click

from appliance import __version__
from appliance.cli import audit, catalog, identity, keys, retention, security, server


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="appliance")
def main() -> None:
    """Privacy-focused on-prem fine-tuning appliance."""
    # Everything the appliance writes (database, keys, logs, blobs) is private.
    os.umask(0o077)


for _command in (
    server.init, server.serve, server.show_settings,
    identity.projects, identity.users, identity.tokens,
    audit.audit,
    keys.keys,
    retention.retention,
    catalog.models, catalog.adapters,
    security.deps,
):
    main.add_command(_command)


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
