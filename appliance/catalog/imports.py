"""Base-model imports started through the API: run in the background, followed by id.

An admin places a model (a Hugging Face directory, sharded safetensors included, a
GGUF file or a diffusers pipeline) in the import directory on the host
(``APPLIANCE_MODEL_IMPORT_DIR``, by default ``<home>/imports``) and asks for it by
its path there: ``POST /v1/model_imports``. Copying and checking a 70B model takes
minutes, so the request answers at once with an import object whose ``events``
say how far it is (each file copied, the checks) and whose ``status`` ends
``succeeded`` (the model is listed in ``/v1/models``) or ``failed`` (``error``
names the problem, as the CLI would). Nothing outside the import directory can
be named (no ``..``, no absolute paths, no links out).

Every import is audited: who asked for what (``model.import.request``), and how it
ended (``model.import`` with the catalogue row in the same transaction, or a
failure). Imports are tracked in memory: after a restart the list starts empty, and
an import interrupted by it left nothing behind (the importer stages beside the
store and renames into place).
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from appliance.audit.service import AuditContext, record
from appliance.catalog.names import check_model_name
from appliance.db.base import utcnow
from appliance.errors import ApplianceError, ConflictError, InvalidRequestError, NotFoundError

if TYPE_CHECKING:
    from appliance.catalog.service import CatalogService

log = logging.getLogger(__name__)

#: Imports kept for ``GET`` after they end (the oldest finished ones go first).
MAX_KEPT = 100

Status = Literal["running", "succeeded", "failed"]


@dataclass
class ModelImport:
    """One import and how far it is."""

    id: str
    name: str
    source: str
    created_by: str
    created_at: int
    status: Status = "running"
    events: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    finished_at: int | None = None

    def event(self, message: str) -> None:
        self.events.append({"created_at": int(utcnow().timestamp()), "message": message})


class ModelImports:
    """Starts imports in background threads and answers for them.

    Args:
        catalog: Imports the model and records it (:meth:`CatalogService.import_model`).
        import_dir: The only directory sources may be named in.
    """

    def __init__(self, catalog: CatalogService, import_dir: Path) -> None:
        self.catalog, self.import_dir = catalog, Path(import_dir)
        self._imports: dict[str, ModelImport] = {}
        self._lock = threading.Lock()

    def start(self, ctx: AuditContext, source: str, name: str) -> ModelImport:
        """Check the request, audit it and start the import; the running import.

        Raises:
            InvalidRequestError: ``source`` is not a relative path inside the import directory, or
                ``name`` is malformed.
            NotFoundError: Nothing is at ``source``.
            ConflictError: A model ``name`` exists or is being imported.
        """
        check_model_name(name, param="model")
        path = self.resolve(source)
        if self.catalog.has_base_model(name):
            raise ConflictError(f"base model {name!r} already exists", param="model")
        task = ModelImport(id=f"modelimport-{secrets.token_hex(8)}", name=name, source=source,
                           created_by=ctx.actor, created_at=int(utcnow().timestamp()))
        with self._lock:
            if any(t.name == name and t.status == "running" for t in self._imports.values()):
                raise ConflictError(f"base model {name!r} is being imported already", param="model")
            self._keep(task)
        with self.catalog.db.transaction() as s:
            record(s, ctx, "model.import.request", resource_type="base_model", resource_id=name,
                   details={"import_id": task.id, "source": source})
        task.event(f"import of {source!r} as {name!r} requested by {ctx.actor}")
        threading.Thread(target=self._run, args=(ctx, task, path), daemon=True, name="model-import").start()
        return task

    def get(self, import_id: str) -> ModelImport:
        with self._lock:
            task = self._imports.get(import_id)
        if task is None:
            raise NotFoundError(f"model import {import_id[:64]!r} not found; see GET /v1/model_imports",
                                param="import_id")
        return task

    def list(self) -> list[ModelImport]:
        with self._lock:
            return sorted(self._imports.values(), key=lambda t: (t.created_at, t.id), reverse=True)

    def resolve(self, source: Any) -> Path:
        """``source`` as a path inside the import directory (links followed), or a 400/404 naming it."""
        if not isinstance(source, str) or not source.strip():
            raise InvalidRequestError(f"`source` must be a path inside the import directory; got {source!r}",
                                      param="source")
        relative = Path(source)
        if relative.is_absolute() or ".." in relative.parts:
            raise InvalidRequestError(
                f"`source` must be a relative path inside the import directory (no '..'); got {source!r}",
                param="source")
        root = self.import_dir.resolve()
        try:
            path = (root / relative).resolve()
            exists = path.exists()
        except (OSError, ValueError) as exc:  # a NUL byte, a name too long for the file system
            raise InvalidRequestError(f"`source` {source[:200]!r} is not a usable path: {type(exc).__name__}",
                                      param="source") from None
        if not path.is_relative_to(root):
            raise InvalidRequestError(f"`source` {source!r} leads out of the import directory", param="source")
        if not exists:
            raise NotFoundError(f"`source` {source!r} is not in the import directory; place the model there "
                                "first", param="source")
        return path

    def _run(self, ctx: AuditContext, task: ModelImport, path: Path) -> None:
        try:
            self.catalog.import_model(ctx, path, task.name, on_progress=task.event)
        except BaseException as exc:  # noqa: BLE001 - reported on the import and audited, never re-raised
            if isinstance(exc, ApplianceError):  # the importer names its own arguments: say the request's fields
                task.error = {"code": exc.code, "message": exc.message,
                              "param": {"src": "source", "name": "model"}.get(exc.param, exc.param)}
            else:
                task.error = {"code": "import_failed", "message": f"the import failed with {type(exc).__name__}",
                              "param": None}
            try:  # audited before the status flips, so whoever sees "failed" finds the audit event too
                with self.catalog.db.transaction() as s:
                    record(s, ctx, "model.import", outcome="failure", resource_type="base_model",
                           resource_id=task.name, reason=task.error["code"],
                           details={"import_id": task.id, "source": task.source})
            except Exception:  # the import's own failure is what the admin sees; the log says why this failed
                log.exception("auditing a failed model import failed", extra={"import_id": task.id})
            task.event(f"failed: {task.error['message']}")
            task.status, task.finished_at = "failed", int(utcnow().timestamp())
            return
        task.event(f"imported: {task.name!r} is listed in /v1/models")
        task.status, task.finished_at = "succeeded", int(utcnow().timestamp())

    def _keep(self, task: ModelImport) -> None:
        self._imports[task.id] = task
        finished = sorted((t for t in self._imports.values() if t.status != "running"), key=lambda t: t.created_at)
        for old in finished[: max(0, len(self._imports) - MAX_KEPT)]:
            del self._imports[old.id]
