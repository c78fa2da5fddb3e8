"""``appliance keys rotate``: re-wrap every data key under a new master KEK."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from appliance.audit.service import AuditContext, record
from appliance.crypto.envelope import FileKeyProvider, WrappedKey, wrap_with
from appliance.db.base import Database, utcnow
from appliance.storage.blobs import key_context
from appliance.storage.models import DataKey


@dataclass(frozen=True)
class RotationResult:
    new_kek_id: str
    rewrapped: int
    retired_kek_ids: list[str]


def rotate_keys(db: Database, keys: FileKeyProvider, ctx: AuditContext) -> RotationResult:
    """Add a new KEK, re-wrap all live data keys under it, then drop the old KEKs.

    Crash safety: the new KEK is saved next to the old ones before any data
    key changes; all re-wrapping and its audit event commit in one
    transaction; old KEKs leave the key file only after that commit. At every
    point each object opens with exactly one KEK present in the file, and
    running the command again finishes an interrupted rotation.
    """
    old_ring = dict(keys.keyring.keys)
    new_id = keys.add_active_kek()
    new_kek = keys.keyring.keys[new_id]
    total = 0
    # Loop: a server that wrapped a key under the old KEK just before it saw
    # the new one may commit after our first pass; catch such rows too.
    while True:
        with db.transaction() as s:
            rows = list(s.scalars(
                select(DataKey).where(DataKey.wrapped.is_not(None), DataKey.kek_id != new_id)
            ))
            for row in rows:
                context = key_context(row.object_id, row.project)
                data_key = keys.unwrap(WrappedKey(row.kek_id, row.wrapped), context)
                sealed = wrap_with(new_kek, new_id, data_key, context)
                row.kek_id, row.wrapped, row.rewrapped_at = sealed.kek_id, sealed.blob, utcnow()
            if rows or total == 0:
                record(
                    s, ctx, "keys.rotate", resource_type="keyring", resource_id=new_id,
                    details={"rewrapped": len(rows), "previous_kek_ids": sorted(old_ring)},
                )
        total += len(rows)
        if not rows:
            break
    retired = keys.retire_all_but_active()
    return RotationResult(new_id, total, retired)
