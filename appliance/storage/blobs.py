"""Write, read and shred encrypted blobs under ``$APPLIANCE_HOME/data/blobs``.

Plaintext exists only in memory: writers encrypt segment by segment into a
temporary file in the blob directory that is renamed into place when the
object is complete, and removed if it is not. A writer holds an exclusive
``flock`` on its temporary until then; the kernel drops it when the process
dies, which is how a sweep at start-up tells the leftovers of a crash from the
writes of a live replica sharing the directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.orm import Session

from appliance.crypto.envelope import KeyProvider, WrappedKey, new_data_key
from appliance.crypto.stream import SegmentEncryptor, blob_context, decrypt_stream
from appliance.db.base import utcnow
from appliance.errors import InsufficientStorageError, NotFoundError
from appliance.storage.models import DataKey

log = logging.getLogger("appliance.storage")

TMP_PREFIX = ".tmp-"
#: An empty temporary younger than this may be between its creation and its writer's lock.
_JUST_CREATED_S = 60
#: errno values that mean "no room": the disk or a quota is full, or a file size limit (RLIMIT_FSIZE) was hit.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


@contextlib.contextmanager
def _no_space_is_a_domain_error(object_id: str) -> Iterator[None]:
    """Turn a full disk into :class:`InsufficientStorageError` (HTTP 507); other OS errors pass through."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        hint = " or raise the file size limit (ulimit -f)" if exc.errno == errno.EFBIG else ""
        raise InsufficientStorageError(
            f"cannot store {object_id!r}: {os.strerror(exc.errno)}; free space in the data directory "
            f"($APPLIANCE_HOME/data){hint} and try again"
        ) from None


def key_context(object_id: str, project: str) -> str:
    return f"{object_id}|{project}"


@dataclass(frozen=True)
class ShredEvidence:
    """What crypto-shredding destroyed, for the audit log."""

    object_id: str
    kek_id: str
    shredded_at: datetime


def _derive(data_key: bytes, purpose: str, project: str, object_id: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    info = f"appliance {purpose} {project}/{object_id}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(data_key)


class BlobWriter:
    """Streams plaintext into a new encrypted blob; see :meth:`BlobStore.create`."""

    def __init__(self, store: BlobStore, object_id: str, project: str, kind: str) -> None:
        self.store, self.object_id, self.project, self.kind = store, object_id, project, kind
        self._data_key = new_data_key()
        self._wrapped = store.keys.wrap(self._data_key, key_context(object_id, project))
        self._enc = SegmentEncryptor(self._data_key, blob_context(object_id, project))
        self.final_path = store.path_of(object_id)
        self.final_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._tmp = self.final_path.with_name(f"{TMP_PREFIX}{object_id}.{secrets.token_hex(4)}")
        with _no_space_is_a_domain_error(object_id):
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed: marks the temporary as being written
        self._fh = os.fdopen(fd, "wb")
        self.ciphertext_bytes = 0
        self._done = False

    @property
    def plaintext_bytes(self) -> int:
        return self._enc.plaintext_bytes

    def derive_secret(self, purpose: str) -> bytes:
        """A 32-byte secret of this blob for ``purpose`` (HKDF-SHA256 of its data key): gone when the blob is shredded."""
        return _derive(self._data_key, purpose, self.project, self.object_id)

    def write(self, data: bytes) -> None:
        out = self._enc.update(data)
        if out:
            with _no_space_is_a_domain_error(self.object_id):
                self._fh.write(out)
            self.ciphertext_bytes += len(out)

    def finish(self) -> DataKey:
        """Seal, fsync and move the blob into place; returns its (unsaved) key row.

        The caller adds the row in the transaction that records the object,
        and calls :meth:`abort` if that transaction fails.
        """
        out = self._enc.finish()
        with _no_space_is_a_domain_error(self.object_id):
            self._fh.write(out)
            self.ciphertext_bytes += len(out)
            self._fh.flush()
            os.fsync(self._fh.fileno())
        # Renamed before closing, so that the temporary is never unlocked while it exists.
        os.replace(self._tmp, self.final_path)
        self._done = True
        self._fh.close()
        return DataKey(
            object_id=self.object_id, project=self.project, kind=self.kind, kek_id=self._wrapped.kek_id,
            wrapped=self._wrapped.blob, ciphertext_bytes=self.ciphertext_bytes,
        )

    def abort(self) -> None:
        """Discard everything written; safe to call more than once."""
        if not self._fh.closed:
            # On a full disk, flushing what is still buffered fails again; the file is closed and removed anyway.
            with contextlib.suppress(OSError):
                self._fh.close()
        self._tmp.unlink(missing_ok=True)
        if self._done:
            self.final_path.unlink(missing_ok=True)


class BlobStore:
    """Encrypted objects on disk, keys in the ``data_keys`` table.

    Args:
        root: Directory of the blobs (created 0700).
        keys: Wraps and unwraps the data keys.
    """

    def __init__(self, root: Path, keys: KeyProvider) -> None:
        self.root = root
        self.keys = keys
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path_of(self, object_id: str) -> Path:
        return self.root / object_id[-2:] / f"{object_id}.blob"

    def create(self, object_id: str, project: str, kind: str) -> BlobWriter:
        return BlobWriter(self, object_id, project, kind)

    @contextlib.contextmanager
    def writing(self, object_id: str, project: str, kind: str) -> Iterator[BlobWriter]:
        """A writer that is aborted if the block raises."""
        writer = self.create(object_id, project, kind)
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise

    def data_key(self, session: Session, object_id: str) -> tuple[bytes, str]:
        """The unwrapped data key of a stored object and its project (a worker decrypts in memory with it)."""
        row = session.get(DataKey, object_id)
        if row is None or row.wrapped is None:
            raise NotFoundError(f"object {object_id!r} has no key (deleted)")
        return self.keys.unwrap(WrappedKey(row.kek_id, row.wrapped), key_context(object_id, row.project)), row.project

    def read(self, session: Session, object_id: str) -> Iterator[bytes]:
        """Decrypt an object segment by segment (raises IntegrityError on tampering)."""
        return self.opener(session, object_id)()

    def opener(self, session: Session, object_id: str) -> Callable[[], Iterator[bytes]]:
        """A function that decrypts the object segment by segment each time it is called.

        The key is looked up now (NotFoundError if the object is gone), so the
        reads may come later, outside ``session``, and more than once.
        """
        data_key, project = self.data_key(session, object_id)
        context = blob_context(object_id, project)
        path = self.path_of(object_id)

        def generate() -> Iterator[bytes]:
            with open(path, "rb") as fh:
                yield from decrypt_stream(data_key, context, fh)

        return generate

    def derive_secret(self, session: Session, object_id: str, purpose: str) -> bytes:
        """:meth:`BlobWriter.derive_secret` of a stored object."""
        data_key, project = self.data_key(session, object_id)
        return _derive(data_key, purpose, project, object_id)

    def shred(self, session: Session, object_id: str) -> ShredEvidence:
        """Destroy the wrapped data key in ``session``'s transaction.

        Once that commits, the ciphertext is unrecoverable even with the master
        key; call :meth:`remove` after the commit to delete the file as well.
        """
        row = session.get(DataKey, object_id)
        if row is None:
            raise NotFoundError(f"object {object_id!r} not found")
        row.wrapped = None
        row.shredded_at = utcnow()
        session.flush()
        return ShredEvidence(object_id, row.kek_id, row.shredded_at)

    def remove(self, object_id: str) -> bool:
        """Delete an object's ciphertext file; True if there was one."""
        path = self.path_of(object_id)
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def remove_after_commit(self, session: Session, object_id: str) -> None:
        """Delete an object's ciphertext once ``session``'s transaction commits (never if it rolls back).

        For an object shredded in a transaction that is not the caller's own to finish (a hook's, inside
        another deletion): the key is gone at the commit, the file goes right after it.
        """
        def remove(_session: Session) -> None:
            try:
                self.remove(object_id)
            except OSError:  # the key is gone: the ciphertext is unreadable; a leftover is only disk space
                log.warning("a shredded object's ciphertext could not be removed", extra={"object_id": object_id})

        event.listen(session, "after_commit", remove, once=True)

    def sweep_temporaries(self) -> int:
        """Remove leftovers of writes interrupted by a crash; returns how many.

        Temporaries still locked by their writer (another replica's upload in progress) are left alone.
        """
        count = 0
        for tmp in self.root.glob(f"*/{TMP_PREFIX}*"):
            try:
                fd = os.open(tmp, os.O_RDONLY)
            except FileNotFoundError:
                continue  # finished or aborted meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                st = os.fstat(fd)
                if st.st_size == 0 and time.time() - st.st_mtime < _JUST_CREATED_S:
                    continue  # may be created but not yet locked by its writer
                tmp.unlink(missing_ok=True)
                count += 1
            except BlockingIOError:
                continue  # a live writer holds it
            finally:
                os.close(fd)
        return count
