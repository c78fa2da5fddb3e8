"""Signed checkpoints of the audit log and their verification.

A checkpoint is an Ed25519-signed statement "the first N events of this log
have Merkle root R" (RFC 9162 hashing over one leaf per event: its seq and
chain hash). Exported off the box, it lets anyone detect a later rewrite of
those N events, even by someone who holds root and could recompute the
whole hash chain: the rewritten log no longer has root R, and no
consistency proof from the checkpoint to the current log verifies.
"""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from appliance.audit import merkle
from appliance.audit.models import AuditCheckpoint, AuditEvent, AuditHead
from appliance.audit.service import AuditContext, record
from appliance.crypto.signing import public_key_pem, sign, verify
from appliance.db.base import Database, utcnow

FORMAT = "appliance-audit-checkpoint/1"


def leaf_data(seq: int, chain_hash: str) -> bytes:
    return seq.to_bytes(8, "big") + bytes.fromhex(chain_hash)


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def leaf_hashes(db: Database, limit: int | None = None) -> list[bytes]:
    """Leaf hashes of the first ``limit`` events (all when None), in seq order."""
    out: list[bytes] = []
    last = 0
    with db.read() as s:
        while limit is None or len(out) < limit:
            batch = 5000 if limit is None else min(5000, limit - len(out))
            rows = s.execute(select(AuditEvent.seq, AuditEvent.hash).where(AuditEvent.seq > last)
                             .order_by(AuditEvent.seq).limit(batch)).all()
            if not rows:
                break
            out += [merkle.leaf_hash(leaf_data(seq, h)) for seq, h in rows]
            last = rows[-1][0]
    return out


@dataclass(frozen=True)
class CheckpointFile:
    """What ``appliance audit checkpoint --out FILE`` writes."""

    document: dict[str, Any]
    signature: str
    public_key: str

    def to_json(self) -> str:
        return json.dumps({"checkpoint": self.document, "signature": self.signature,
                           "public_key": self.public_key}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointFile:
        doc = json.loads(text)
        return cls(doc["checkpoint"], doc["signature"], doc["public_key"])


def latest_checkpoint(s: Session) -> AuditCheckpoint | None:
    return s.scalar(select(AuditCheckpoint).order_by(AuditCheckpoint.id.desc()).limit(1))


def create_checkpoint(db: Database, key: Ed25519PrivateKey, ctx: AuditContext) -> CheckpointFile:
    """Sign the current tree head, store it, and audit that it was made."""
    with db.transaction() as s:
        head = s.get(AuditHead, 1)
        size = s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.seq <= head.seq)) or 0
        hashes = leaf_hashes(db, size) if size else []
        root = merkle.root_from_leaf_hashes(hashes).hex()
        document = {
            "format": FORMAT, "origin": socket.gethostname(), "tree_size": size, "root_hash": root,
            "chain_head": {"seq": head.seq, "hash": head.hash}, "timestamp": utcnow().isoformat(),
            "key_id": key_id(key.public_key()),
        }
        signature = sign(key, document)
        s.add(AuditCheckpoint(tree_size=size, root_hash=root, document=document, signature=signature,
                              created_at=utcnow()))
        record(s, ctx, "audit.checkpoint", resource_type="audit_log", resource_id=str(size),
               details={"tree_size": size, "root_hash": root, "key_id": document["key_id"]})
    return CheckpointFile(document, signature, public_key_pem(key))


@dataclass(frozen=True)
class CheckpointVerdict:
    ok: bool
    message: str
    tree_size: int = 0
    current_size: int = 0


def verify_checkpoint(db: Database, checkpoint: CheckpointFile, trusted: Ed25519PublicKey) -> CheckpointVerdict:
    """Check a checkpoint's signature against ``trusted`` and its root against the current log."""
    doc = checkpoint.document
    if doc.get("format") != FORMAT:
        return CheckpointVerdict(False, f"not an audit checkpoint (format {doc.get('format')!r})")
    if not verify(trusted, doc, checkpoint.signature):
        return CheckpointVerdict(False, "signature does not verify under the trusted public key")
    size, root = int(doc["tree_size"]), bytes.fromhex(doc["root_hash"])
    hashes = leaf_hashes(db)
    current = len(hashes)
    if current < size:
        return CheckpointVerdict(False, f"the log has {current} events but the checkpoint covers {size}: "
                                        "events were deleted", size, current)
    if size == 0:
        return CheckpointVerdict(True, "empty checkpoint: trivially consistent", size, current)
    if merkle.root_from_leaf_hashes(hashes[:size]) != root:
        return CheckpointVerdict(False, f"the first {size} events no longer hash to the checkpoint's root: "
                                        "the log was rewritten", size, current)
    proof = merkle.consistency_proof(hashes, size)
    if not merkle.verify_consistency(size, current, root, merkle.root_from_leaf_hashes(hashes), proof):
        return CheckpointVerdict(False, "consistency proof failed", size, current)
    return CheckpointVerdict(True, f"the log's first {size} events match the checkpoint; the current log "
                                   f"({current} events) extends it (consistency proof verified)", size, current)


def load_public_key(pem: str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def inclusion(db: Database, seq: int, tree_size: int | None = None) -> dict[str, Any]:
    """An inclusion proof for event ``seq`` in the tree of ``tree_size`` events (default: all)."""
    hashes = leaf_hashes(db, tree_size)
    index = seq - 1
    proof = merkle.inclusion_proof(hashes, index)
    return {"seq": seq, "tree_size": len(hashes), "leaf_hash": hashes[index].hex(),
            "root_hash": merkle.root_from_leaf_hashes(hashes).hex(), "proof": [p.hex() for p in proof]}


def consistency(db: Database, first: int, second: int | None = None) -> dict[str, Any]:
    hashes = leaf_hashes(db, second)
    return {"first": first, "second": len(hashes),
            "first_root": merkle.root_from_leaf_hashes(hashes[:first]).hex(),
            "second_root": merkle.root_from_leaf_hashes(hashes).hex(),
            "proof": [p.hex() for p in merkle.consistency_proof(hashes, first)]}


class CheckpointTimer:
    """Signs a checkpoint every ``interval_s`` seconds while the log grows (a server thread).

    Args:
        db: The database.
        key_provider: Returns the Ed25519 signing key.
        interval_s: Seconds between checkpoints; 0 disables the timer.
    """

    def __init__(self, db: Database, key_provider, interval_s: int) -> None:
        import threading

        self.db, self.key_provider, self.interval_s = db, key_provider, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _due(self) -> bool:
        with self.db.read() as s:
            head = s.get(AuditHead, 1)
            last = s.scalar(select(AuditCheckpoint.tree_size).order_by(AuditCheckpoint.id.desc()).limit(1))
        return head is not None and head.seq > (last or 0)

    def _run(self) -> None:
        import logging

        ctx = AuditContext(actor="system:checkpoint", auth_method="internal", origin_ip="local")
        while not self._stop.wait(self.interval_s):
            try:
                if self._due():
                    create_checkpoint(self.db, self.key_provider(), ctx)
            except Exception:
                logging.getLogger("appliance.audit").exception("periodic checkpoint failed")

    def start(self) -> None:
        import threading

        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._run, name="audit-checkpoints", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
