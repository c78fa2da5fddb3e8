"""Base models and adapters: import, list, publish, read and export."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance import __version__
from appliance.audit.service import AuditContext, record
from appliance.catalog.archive import AdapterArchive, unpack_files
from appliance.catalog.models import AdapterRecord, BaseModelRecord
from appliance.catalog.names import check_model_name
from appliance.crypto.signing import load_or_create_signing_key, public_key_pem, sign, verify
from appliance.db.base import Database, created_before, utcnow
from appliance.errors import MODEL_NAME_LIKE, ConflictError, InvalidRequestError, NotFoundError, echo
from appliance.identity.service import Principal, project_by_id, project_names
from appliance.storage.blobs import BlobStore, ShredEvidence

if TYPE_CHECKING:
    from appliance.identity.models import Project

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
#: The tiny randomly initialised Stable Diffusion pipeline (``models import --demo-images``).
DEMO_IMAGE_MODEL_NAME = "tiny-sd-random"


def _adapter_object_id(job_id: str) -> str:
    return f"adapter-{job_id.removeprefix('ftjob-')}"


@dataclass(frozen=True)
class AdapterView:
    row: AdapterRecord
    project: str


#: Called with the adapter id after it is published or before it is removed.
AdapterHook = Callable[[str], None]


#: Files imported as single-file Stable Diffusion checkpoints (pickled ones only to be refused, naming why).
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
#: The ``kind`` of fidelity evaluators (a CLIP model, a DINO ViT): listed, never served or fine-tuned.
EVALUATOR_KIND = "evaluator"


@dataclass(frozen=True)
class EvaluatorRef:
    """An evaluator an image job is scored with: its store name, folder and content hash."""

    name: str
    path: str
    content_hash: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path, "content_hash": self.content_hash}


class CatalogService:
    """The model catalogue.

    Args:
        db: The database.
        blobs: Encrypted storage for adapters.
        models_dir: Where imported base models live (plaintext: they are not customer data).
        signing_key_path: Ed25519 key signing adapter manifests.
    """

    def __init__(self, db: Database, blobs: BlobStore, models_dir: Path, signing_key_path: Path,
                 import_dir: Path | None = None) -> None:
        from appliance.catalog.imports import ModelImports

        self.db, self.blobs, self.models_dir = db, blobs, models_dir
        #: Imports started through the API, from ``import_dir`` only.
        self.imports = ModelImports(self, import_dir or models_dir.parent / "imports")
        self.signing_key_path = signing_key_path
        self.on_publish: list[AdapterHook] = []
        self.on_remove: list[AdapterHook] = []
        #: ``(session, audit context, adapter id, base model)``, called inside the transaction that shreds an
        #: adapter (a deletion, a withdrawal, retention), after its ``adapter.delete`` event: what holds its
        #: generations goes with it (the evaluations package registers its result files; wired in
        #: :mod:`appliance.server.state`).
        self.on_shred: list[Callable[[Session, AuditContext, str, str], None]] = []
        #: Adapters operators loaded at run time, name -> base model: the serving layer answers
        #: (:class:`appliance.inference.service.InferenceService` sets it); none without one.
        self.runtime_adapters: Callable[[], dict[str, str]] = dict

    # -- base models --------------------------------------------------------
    def import_model(self, ctx: AuditContext, src: Path, name: str, *, demo: bool = False,
                     on_progress: Callable[[str], None] | None = None) -> BaseModelRecord:
        """Import a Hugging Face directory, GGUF file or diffusers pipeline as base model ``name`` (no network),
        or a CLIP model / DINO ViT folder as a fidelity evaluator (kind ``evaluator``).

        ``on_progress`` is called with a sentence at each stage (each weight file copied, the checks).
        """
        from appliance.diffusion.evaluators import is_evaluator_folder
        from appliance.modelstore import import_model

        check_model_name(name)
        if self.has_base_model(name):
            raise ConflictError(f"base model {name!r} already exists", param="name")
        dest = self.models_dir / name
        if dest.exists():
            shutil.rmtree(dest)  # leftover of an interrupted import: nothing references it
        self.models_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            single_file = Path(src).is_file() and Path(src).suffix.lower() in SINGLE_FILE_SUFFIXES
            if (Path(src) / "model_index.json").is_file() or single_file:
                from appliance.diffusion import import_diffusers_model
                from appliance.diffusion.single_file import import_single_file

                if single_file:  # a Stable Diffusion checkpoint in one file: converted with shipped configs
                    dinfo = import_single_file(src, dest, name, on_progress=on_progress)
                else:
                    if on_progress:
                        on_progress("copying and checking the diffusers pipeline")
                    dinfo = import_diffusers_model(src, dest, name)
                kind, architecture, parameters = "diffusion", dinfo.pipeline_class, dinfo.parameter_count
                info, details = dinfo, {"family": dinfo.family, "test_pipeline": dinfo.test_pipeline,
                                        "single_file": single_file}
            elif is_evaluator_folder(Path(src)):  # scores image jobs; never served or trained
                from appliance.diffusion.evaluators import import_evaluator_model

                if on_progress:
                    on_progress("copying and checking the evaluator model")
                info = import_evaluator_model(src, dest, name)
                kind, architecture, parameters = EVALUATOR_KIND, info.model_class, info.parameter_count
                details = {"family": info.family, "image_processor": info.image_processor}
            else:
                info = import_model(src, dest, name, on_progress=on_progress)
                kind, architecture, parameters, details = "llm", info.architecture, info.parameter_count, {}
            with self.db.transaction() as s:
                row = BaseModelRecord(
                    name=name, kind=kind, path=str(dest), content_hash=info.content_hash,
                    architecture=architecture, parameters=parameters,
                    info={**info.to_dict(), "source": str(src), "demo": demo},
                    imported_by=ctx.actor,
                )
                s.add(row)
                s.flush()
                record(s, ctx, "model.import", resource_type="base_model", resource_id=name,
                       details={"kind": kind, "content_hash": info.content_hash,
                                "source_hash": getattr(info, "source_hash", None), "architecture": architecture,
                                "parameters": parameters, "source": Path(src).name, **details})
            return row
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise

    def has_base_model(self, name: str) -> bool:
        with self.db.read() as s:
            return self.base_model_in(s, name) is not None

    def list_base_models(self) -> list[BaseModelRecord]:
        with self.db.read() as s:
            return list(s.scalars(select(BaseModelRecord).order_by(BaseModelRecord.created_at)))

    @staticmethod
    def base_models_in(s: Session) -> list[BaseModelRecord]:
        """Every base model, by name, read in the caller's transaction."""
        return list(s.scalars(select(BaseModelRecord).order_by(BaseModelRecord.name)))

    @staticmethod
    def base_model_in(s: Session, name: str) -> BaseModelRecord | None:
        """The base model named ``name``, read in the caller's transaction."""
        return s.scalar(select(BaseModelRecord).where(BaseModelRecord.name == name))

    def get_base_model(self, name: str, *, param: str = "model", evaluators: bool = False) -> BaseModelRecord:
        """The base model ``name``; an evaluator only with ``evaluators`` (else a 400: it serves and trains nothing)."""
        with self.db.read() as s:
            row = self.base_model_in(s, name)
        if row is None:
            raise NotFoundError(f"model {echo(name, MODEL_NAME_LIKE)} not found; see GET /v1/models", param=param)
        if row.kind == EVALUATOR_KIND and not evaluators:
            raise InvalidRequestError(
                f"model {name!r} is a fidelity evaluator ({row.architecture}): it scores image fine-tuning jobs "
                "(CLIP-I, CLIP-T, DINO) and cannot be used for chat, image generation or fine-tuning; name a "
                "text or image base model (GET /v1/models lists each model's `kind`)", param=param)
        return row

    @staticmethod
    def evaluators_in(s: Session) -> dict[str, EvaluatorRef]:
        """The evaluators image jobs are scored with: ``{"clip": ..., "dino": ...}``, each family's first imported.

        The first, not the newest: importing another evaluator does not change how later jobs compare with
        earlier ones.
        """
        rows = s.scalars(select(BaseModelRecord).where(BaseModelRecord.kind == EVALUATOR_KIND)
                         .order_by(BaseModelRecord.created_at, BaseModelRecord.id))
        out: dict[str, EvaluatorRef] = {}
        for row in rows:
            family = (row.info or {}).get("family")
            if family in ("clip", "dino") and family not in out:
                out[family] = EvaluatorRef(row.name, row.path, row.content_hash)
        return out

    def largest_evaluator_parameters(self) -> int:
        """Parameters of the largest evaluator image jobs are scored with (0 without): the memory plan's."""
        with self.db.read() as s:
            refs = self.evaluators_in(s)
            rows = s.scalars(select(BaseModelRecord).where(BaseModelRecord.name.in_([r.name for r in refs.values()])))
            return max((row.parameters or 0 for row in rows), default=0)

    # -- adapters -----------------------------------------------------------
    def signing_key(self):
        return load_or_create_signing_key(self.signing_key_path)

    def public_key_pem(self) -> str:
        return public_key_pem(self.signing_key())

    @staticmethod
    def created_before(s: Session, until: datetime, project_id: int | None = None) -> list[AdapterRecord]:
        """Every adapter created before ``until`` (deleted ones too), of one project or all, oldest first (reports)."""
        return created_before(s, AdapterRecord, until, project_id)

    @staticmethod
    def adapters_created_before(s: Session, project_id: int, cutoff: datetime) -> list[tuple[str, datetime]]:
        """``(id, created_at)`` of the project's live adapters created by ``cutoff`` (retention)."""
        stmt = select(AdapterRecord.id, AdapterRecord.created_at).where(
            AdapterRecord.project_id == project_id, AdapterRecord.deleted_at.is_(None),
            AdapterRecord.created_at <= cutoff)
        return [tuple(r) for r in s.execute(stmt.order_by(AdapterRecord.created_at, AdapterRecord.id))]

    @staticmethod
    def lock_live_adapter(s: Session, adapter_id: str) -> AdapterRecord | None:
        """Lock a live adapter's row for a deletion in ``s``; None when gone or another transaction holds it."""
        return s.scalar(select(AdapterRecord).where(AdapterRecord.id == adapter_id,
                                                    AdapterRecord.deleted_at.is_(None))
                        .with_for_update(skip_locked=True))

    def publish_from_job(self, s: Session, ctx: AuditContext, *, job_id: str, project_id: int, base_model: str,
                         method: str, suffix: str | None, trained_by: str, datasets: list[dict[str, Any]],
                         hyperparameters: dict[str, Any], metrics: dict[str, Any], seed: int | None,
                         privacy: dict[str, Any], files: dict[str, bytes] | AdapterArchive) -> str:
        """Publish a finished job's adapter with its signed lineage manifest; its id (``ft:base:project:suffix:job``).

        ``datasets`` is the training data's lineage (:meth:`appliance.files.service.FileService.lineage`).
        """
        project = project_by_id(s, project_id)
        base = self.base_model_in(s, base_model)
        adapter_id = ":".join(["ft", base_model, project.name, suffix or "", job_id])
        manifest = {
            "format": "appliance-adapter-manifest/1",
            "job_id": job_id, "project": project.name, "trained_by": trained_by,
            "method": method, "base_model": {"name": base.name, "content_hash": base.content_hash},
            "datasets": datasets,
            "hyperparameters": hyperparameters,
            "metrics": metrics, "seed": seed, "privacy": privacy,
            "code_version": __version__, "created_at": utcnow().isoformat(),
        }
        self.publish(s, ctx, adapter_id=adapter_id, job_id=job_id, project=project, base_model=base.name,
                     kind=method, files=files, manifest=manifest)
        return adapter_id

    def adapter_archive(self, job_id: str, project: str) -> AdapterArchive:
        """An encrypted adapter archive for ``job_id`` to stream files into, then hand to :meth:`publish`.

        Nothing is visible until it is published; :meth:`AdapterArchive.abort` discards it.
        """
        return AdapterArchive(self.blobs.create(_adapter_object_id(job_id), project, "adapter"))

    def publish(self, s: Session, ctx: AuditContext, *, adapter_id: str, job_id: str, project: Project,
                base_model: str, kind: str, files: dict[str, bytes] | AdapterArchive,
                manifest: dict[str, Any]) -> AdapterRecord:
        """Encrypt and register an adapter inside the caller's transaction (the job's success).

        ``files`` is ``{name: bytes}``, or an archive from :meth:`adapter_archive` whose files
        have already streamed into storage.
        """
        object_id = _adapter_object_id(job_id)
        if isinstance(files, AdapterArchive):
            archive = files
        else:
            archive = self.adapter_archive(job_id, project.name)
            try:
                for name in sorted(files):
                    archive.add(name, files[name])
            except BaseException:
                archive.abort()
                raise
        try:
            key_row = archive.finish()
            manifest = dict(manifest, adapter=adapter_id, files=dict(sorted(archive.sizes.items())))
            signature = sign(self.signing_key(), manifest)
            s.add(key_row)
            row = AdapterRecord(id=adapter_id, job_id=job_id, project_id=project.id, base_model=base_model,
                                kind=kind, object_id=object_id, manifest=manifest, signature=signature)
            s.add(row)
            s.flush()
            record(s, ctx, "adapter.publish", resource_type="adapter", resource_id=adapter_id,
                   project=project.name, details={"job_id": job_id, "base_model": base_model,
                                                  "manifest_signature": signature[:16]})
        except BaseException:
            archive.abort()  # before or after finish(): nothing of it remains
            raise
        return row

    def _adapter(self, principal: Principal | None, adapter_id: str) -> AdapterView:
        with self.db.read() as s:
            row = s.get(AdapterRecord, adapter_id)
            project = project_by_id(s, row.project_id) if row else None
        if row is None or row.deleted_at is not None:
            raise NotFoundError(f"model {echo(adapter_id, MODEL_NAME_LIKE)} not found", param="model")
        if principal is not None:
            principal.check_project(row.project_id, resource=f"model {adapter_id!r}")
        return AdapterView(row, project.name)

    def get_adapter(self, principal: Principal | None, adapter_id: str) -> AdapterView:
        return self._adapter(principal, adapter_id)

    def list_adapters(self, principal: Principal | None) -> list[AdapterView]:
        with self.db.read() as s:
            stmt = select(AdapterRecord).where(AdapterRecord.deleted_at.is_(None)).order_by(AdapterRecord.created_at)
            if principal is not None and principal.project_id is not None:
                stmt = stmt.where(AdapterRecord.project_id == principal.project_id)
            rows = list(s.scalars(stmt))
            names = project_names(s, {r.project_id for r in rows})
            return [AdapterView(r, names[r.project_id]) for r in rows]

    def adapter_files(self, adapter_id: str) -> dict[str, bytes]:
        """Decrypt an adapter's files into memory (serving and export)."""
        view = self._adapter(None, adapter_id)
        with self.db.read() as s:
            data = b"".join(self.blobs.read(s, view.row.object_id))
        return unpack_files(data)

    def verify_manifest(self, view: AdapterView) -> bool:
        return verify(self.signing_key().public_key(), view.row.manifest, view.row.signature)

    def export(self, principal: Principal | None, ctx: AuditContext, adapter_id: str, dest: Path) -> Path:
        """Write the decrypted adapter directory plus ``manifest.json`` and its signature. Audited."""
        view = self._adapter(principal, adapter_id)
        if dest.exists() and any(dest.iterdir()):
            raise InvalidRequestError(f"destination {dest} is not empty", param="DIR")
        files = self.adapter_files(adapter_id)
        dest.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(data)
        (dest / "manifest.json").write_text(json.dumps(view.row.manifest, indent=2, sort_keys=True))
        (dest / "manifest.sig").write_text(view.row.signature + "\n")
        (dest / "signing-key.pub").write_text(self.public_key_pem())
        with self.db.transaction() as s:
            record(s, ctx, "adapter.export", resource_type="adapter", resource_id=adapter_id,
                   project=view.project, details={"destination": str(dest), "files": sorted(files)})
        return dest

    def trained_on(self, file_id: str) -> list[str]:
        """Ids of the live adapters whose manifest lists ``file_id`` among their training data."""
        return [view.row.id for view in self.list_adapters(None)
                if any(d.get("id") == file_id for d in (view.row.manifest or {}).get("datasets") or [])]

    def withdraw_trained_on(self, file_id: str, ctx: AuditContext) -> list[str]:
        """Delete every adapter trained on a dataset that was just deleted (right to erasure).

        A model trained on erased data still carries it; it is unloaded and its
        artefact crypto-shredded like the dataset.
        """
        withdrawn = []
        for adapter_id in self.trained_on(file_id):
            try:
                self.delete_adapter(None, ctx, adapter_id, reason=f"training data {file_id} was deleted")
            except NotFoundError:  # deleted meanwhile (by hand, by retention, by another replica)
                continue
            withdrawn.append(adapter_id)
        return withdrawn

    def delete_adapter(self, principal: Principal | None, ctx: AuditContext, adapter_id: str, *,
                       reason: str | None = None) -> None:
        """Unload from serving, crypto-shred the artefact and hide the adapter."""
        view = self._adapter(principal, adapter_id)
        self.unload(adapter_id)
        with self.db.transaction() as s:
            row = s.get(AdapterRecord, adapter_id, with_for_update=True)  # two deletes at once: one shreds
            if row.deleted_at is not None:
                raise NotFoundError(f"model {echo(adapter_id, MODEL_NAME_LIKE)} not found", param="model")
            self.shred_adapter(s, ctx, row, view.project, reason=reason)
        self.blobs.remove(view.row.object_id)

    def unload(self, adapter_id: str) -> None:
        """Run :attr:`on_remove` (serving unloads the adapter); the first half of every deletion."""
        for hook in self.on_remove:
            hook(adapter_id)

    def shred_adapter(self, s: Session, ctx: AuditContext, row: AdapterRecord, project: str, *,
                      reason: str | None = None, details: dict[str, Any] | None = None) -> ShredEvidence:
        """The transactional half of every deletion, on a row the caller locked in ``s``.

        Hides the adapter, destroys its data key and audits ``adapter.delete``
        (with ``reason`` and extra ``details``) in the same transaction, then runs
        :attr:`on_shred`. Remove
        the ciphertext (``blobs.remove(row.object_id)``) once it has committed.
        """
        row.deleted_at = utcnow()
        evidence = self.blobs.shred(s, row.object_id)
        record(s, ctx, "adapter.delete", resource_type="adapter", resource_id=row.id, project=project,
               reason=reason, details={**(details or {}), "crypto_shred": {
                   "kek_id": evidence.kek_id, "key_destroyed_at": evidence.shredded_at.isoformat()}})
        for hook in self.on_shred:
            hook(s, ctx, row.id, row.base_model)
        return evidence

    @staticmethod
    def is_live_adapter(s: Session, adapter_id: str) -> bool:
        """Whether the adapter ``adapter_id`` exists and has not been deleted, read in the caller's transaction."""
        row = s.get(AdapterRecord, adapter_id)
        return row is not None and row.deleted_at is None
