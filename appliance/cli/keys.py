"""``appliance keys``: rotation of the master key-encryption keys (see ``appliance.storage.rotation``)."""

from __future__ import annotations

import click

from appliance.bootstrap import open_initialized
from appliance.cli.common import _ctx, _settings, handle_errors


@click.group()
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
