"""Evaluations: validate a request, queue it, list, read and cancel; every state change audited.

An evaluation runs 1-4 models (a base model, its fine-tunes) on one test file, an upload of purpose
``evals`` (scanned, policy-applied and encrypted like training data, and refused as training data).
The :class:`~appliance.evaluations.runner.EvaluationRunner` runs it in a sandboxed worker; the
figures land in the row, the generations (text, or images for an image model) in an encrypted
result file of the project. Each kind of model has its own options: ``max_tokens`` for text models,
``images_per_prompt``, ``num_inference_steps`` and ``seed`` for image models; naming the other
kind's is refused, naming the option.

The result file copies test records and the fine-tunes' generations, so it never outlives them: it is
crypto-shredded in the transaction that deletes the test file or one of the fine-tunes (a user's
deletion, a withdrawal, retention), and the evaluation says when and why (``result_erased_at``).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from appliance.audit.service import AuditContext, record
from appliance.catalog.service import AdapterView, CatalogService
from appliance.db.base import Database, utcnow
from appliance.errors import (
    MODEL_NAME_LIKE,
    ApplianceError,
    ConflictError,
    CrossProjectDenied,
    InvalidFieldsError,
    InvalidRequestError,
    NotFoundError,
    echo,
)
from appliance.evaluations.models import TERMINAL, Evaluation
from appliance.files.service import FileService
from appliance.identity.service import Principal, project_by_id, project_names

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from appliance.identity.models import Project

__all__ = ["TERMINAL", "EvaluationService", "EvaluationView", "new_evaluation_id", "unfinished_evaluation_using"]

#: The file purpose of test files (OpenAI's name for evaluation data).
PURPOSE = "evals"
MAX_MODELS = 4
DEFAULT_SAMPLES, MAX_SAMPLES = 5, 50
#: An image evaluation keeps images_per_prompt images per model of each sample prompt in one result file
#: (up to 8 x 4 x 4 = 128 images; large ones stored as JPEG, see image_task): fewer prompts than text.
MAX_IMAGE_SAMPLES = 8
DEFAULT_MAX_TOKENS, MAX_MAX_TOKENS = 64, 512
#: Image models: images per prompt and model (the DreamBooth paper's evaluation generates 4).
DEFAULT_IMAGES_PER_PROMPT, MAX_IMAGES_PER_PROMPT = 2, 4
#: Image models: denoising steps per image (image jobs sample their before/after images with 25).
DEFAULT_STEPS, MAX_STEPS = 25, 150
DEFAULT_SEED, MAX_SEED = 0, 2**31 - 1
#: The options of each kind of model (a request naming another kind's is refused).
OPTIONS = {"llm": ("max_tokens",), "diffusion": ("images_per_prompt", "num_inference_steps", "seed")}
KIND_NAMES = {"llm": "text", "diffusion": "image"}


def new_evaluation_id() -> str:
    return f"eval-{secrets.token_hex(12)}"


def unfinished_evaluation_using(s: Session, file_id: str) -> str | None:
    """The id of an evaluation that has not finished and reads ``file_id`` (its test file), if any.

    Registered on :attr:`appliance.files.service.FileService.users_of`: a file in use is not re-scanned.
    """
    return s.scalar(select(Evaluation.id).where(Evaluation.file == file_id, Evaluation.status.notin_(TERMINAL))
                    .limit(1))


@dataclass(frozen=True)
class EvaluationView:
    row: Evaluation
    project: str


class EvaluationService:
    """Evaluations of a project.

    Args:
        db: The database.
        catalog: Base models and fine-tuned adapters (what may be evaluated).
        files: The test files.
        wake: Tells the runner there is work.
    """

    def __init__(self, db: Database, catalog: CatalogService, files: FileService,
                 wake: Callable[[], None] = lambda: None) -> None:
        self.db, self.catalog, self.files, self.wake = db, catalog, files, wake

    # -- create -------------------------------------------------------------
    def create(self, principal: Principal, ctx: AuditContext, project: Project, body: dict[str, Any]) -> EvaluationView:
        """Validate the request (every problem reported at once), then queue the evaluation.

        ``body``: ``file`` (an ``evals`` file id), ``models`` (1-4 model ids on one base model),
        ``samples`` (prompts whose generations are kept side by side); text models: ``max_tokens`` (per
        answer); image models: ``images_per_prompt``, ``num_inference_steps`` and ``seed`` (the same seeds
        for every model).
        """
        problems: list[ApplianceError] = []
        samples = _bounded(body, "samples", DEFAULT_SAMPLES, 0, MAX_SAMPLES, problems)
        models = body.get("models")
        bases: list[tuple[str, str]] = []
        if (not isinstance(models, list) or not 1 <= len(models) <= MAX_MODELS
                or not all(isinstance(m, str) and m for m in models)):
            problems.append(InvalidRequestError(
                f"`models` must be a list of 1 to {MAX_MODELS} model ids (base models or fine-tuned ones); "
                f"got {str(models)[:80]!r}", param="models"))
            models = []
        elif len(set(models)) != len(models):
            problems.append(InvalidRequestError(f"`models` names a model twice; got {models!r}", param="models"))
        for i, model in enumerate(models):
            try:
                bases.append(self._base_of(principal, project, model, f"models[{i}]"))
            except (InvalidRequestError, NotFoundError) as exc:
                problems.append(exc)
        if len(set(bases)) > 1:
            problems.append(InvalidRequestError(
                f"`models` must all run on one base model (one evaluation loads one); got "
                f"{sorted({name for name, _ in bases})!r}: evaluate each base model's fine-tunes in their own "
                "evaluation", param="models"))
        kind = bases[0][1] if bases else None
        max_tokens, images = self._options(body, kind, models, problems)
        if kind == "diffusion" and samples > MAX_IMAGE_SAMPLES:
            problems.append(InvalidRequestError(
                f"`samples` must be at most {MAX_IMAGE_SAMPLES} for image models (each keeps images_per_prompt "
                f"images per model of each prompt side by side); got {samples}", param="samples"))
        file_id = body.get("file")
        with self.db.transaction() as s:
            if file_id is None:
                problems.append(InvalidRequestError("`file` is required: the id of an uploaded test file "
                                                    f"(purpose `{PURPOSE}`)", param="file"))
            else:
                try:
                    row = self.files.trainable_file(s, principal, project, file_id, "file", purpose=None)
                    if row.purpose != PURPOSE:
                        problems.append(InvalidRequestError(
                            f"file {file_id!r} has purpose {row.purpose!r}; evaluations run on test files: "
                            f"upload them with purpose `{PURPOSE}`", param="file"))
                except (InvalidRequestError, NotFoundError) as exc:
                    problems.append(exc)
            _raise_all(problems)
            evaluation = Evaluation(
                id=new_evaluation_id(), project_id=project.id, created_by=principal.user, file=file_id,
                models=list(models), base_model=bases[0][0], kind=kind, samples=samples, max_tokens=max_tokens,
                images=images, status="queued", results=[],
            )
            s.add(evaluation)
            s.flush()
            record(s, ctx, "evaluation.create", resource_type="evaluation", resource_id=evaluation.id,
                   project=project.name, details={"file": file_id, "models": list(models), "kind": kind,
                                                  "samples": samples, "max_tokens": max_tokens, "images": images})
        self.wake()
        return EvaluationView(evaluation, project.name)

    def _base_of(self, principal: Principal, project: Project, model: str, param: str) -> tuple[str, str]:
        """The base model ``model`` runs on and its kind; raises naming ``param`` when it is unknown or an evaluator.

        A fine-tune must be ``project``'s own: the result file, in ``project``, holds its generations, so another
        project's fine-tune is refused as not found even for a global caller, who may read both.
        """
        name = model
        if model.startswith("ft:"):
            adapter = self._adapter(principal, model, param)
            if adapter.row.project_id != project.id:
                raise NotFoundError(f"model {echo(model, MODEL_NAME_LIKE)} not found in project {project.name!r}: "
                                    "an evaluation runs base models and the fine-tunes of its own project (the "
                                    "test file's); evaluate another project's fine-tunes on a test file of that "
                                    "project", param=param)
            name = adapter.row.base_model
        base = self.catalog.get_base_model(name, param=param)  # a fidelity evaluator is refused there
        if base.kind not in OPTIONS:
            raise InvalidRequestError(f"model {model!r} runs on a {base.kind!r} model; evaluations run text and "
                                      "image models", param=param)
        return base.name, base.kind

    def _adapter(self, principal: Principal, model: str, param: str) -> AdapterView:
        """The fine-tune ``model``; missing or another project's (for this caller) is a 404 naming ``param``.

        The catalogue names ``model``, its own API's field; here the field is ``models[i]``.
        """
        try:
            return self.catalog.get_adapter(principal, model)
        except NotFoundError as exc:  # CrossProjectDenied stays one: it is audited as a denial
            raise type(exc)(exc.message, param=param) from None

    @staticmethod
    def _options(body: dict[str, Any], kind: str | None, models: list[str],
                 problems: list[ApplianceError]) -> tuple[int | None, dict[str, int] | None]:
        """``max_tokens`` (text models) and the image settings (image models); another kind's option is a problem.

        With ``kind`` unknown (the models were refused) only ``max_tokens`` is checked, as before image models.
        """
        for other, names in OPTIONS.items():
            for name in names if kind is not None and other != kind else ():
                if body.get(name) is not None:
                    problems.append(InvalidRequestError(
                        f"`{name}` applies to {KIND_NAMES[other]} models; {models[0]!r} runs on "
                        f"{'an' if kind == 'diffusion' else 'a'} {KIND_NAMES[kind]} model: leave `{name}` out",
                        param=name))
        if kind != "diffusion":
            return _bounded(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, MAX_MAX_TOKENS, problems), None
        return None, {
            "images_per_prompt": _bounded(body, "images_per_prompt", DEFAULT_IMAGES_PER_PROMPT, 1,
                                          MAX_IMAGES_PER_PROMPT, problems),
            "num_inference_steps": _bounded(body, "num_inference_steps", DEFAULT_STEPS, 1, MAX_STEPS, problems),
            "seed": _bounded(body, "seed", DEFAULT_SEED, 0, MAX_SEED, problems),
        }

    # -- read ---------------------------------------------------------------
    def get(self, principal: Principal, evaluation_id: str) -> EvaluationView:
        with self.db.read() as s:
            row = s.get(Evaluation, evaluation_id)
            project = project_by_id(s, row.project_id) if row else None
        if row is None:
            raise NotFoundError(f"evaluation {evaluation_id!r} not found", param="evaluation_id")
        principal.check_project(row.project_id, resource=f"evaluation {evaluation_id!r}")
        return EvaluationView(row, project.name)

    def list(self, principal: Principal, *, after: str | None, limit: int) -> tuple[list[EvaluationView], bool]:
        with self.db.read() as s:
            stmt = select(Evaluation)
            if principal.project_id is not None:
                stmt = stmt.where(Evaluation.project_id == principal.project_id)
            if after and (anchor := s.get(Evaluation, after)) is not None:
                stmt = stmt.where((Evaluation.created_at < anchor.created_at) | (
                    (Evaluation.created_at == anchor.created_at) & (Evaluation.id < anchor.id)))
            rows = list(s.scalars(stmt.order_by(Evaluation.created_at.desc(), Evaluation.id.desc()).limit(limit + 1)))
            names = project_names(s, {r.project_id for r in rows})
        return [EvaluationView(r, names[r.project_id]) for r in rows[:limit]], len(rows) > limit

    def latest_by_base_model(self, principal: Principal) -> dict[str, EvaluationView]:
        """Per base model, the latest succeeded evaluation of it or its fine-tunes that ``principal`` may see.

        One query for every base model (the catalogue shows them all on one page).
        """
        rank = func.row_number().over(partition_by=Evaluation.base_model,
                                      order_by=(Evaluation.finished_at.desc(), Evaluation.id.desc())).label("rank")
        inner = select(Evaluation.id, rank).where(Evaluation.status == "succeeded")
        if principal.project_id is not None:
            inner = inner.where(Evaluation.project_id == principal.project_id)
        latest = inner.subquery()
        with self.db.read() as s:
            rows = list(s.scalars(select(Evaluation).join(latest, latest.c.id == Evaluation.id)
                                  .where(latest.c.rank == 1)))
            names = project_names(s, {r.project_id for r in rows})
        return {r.base_model: EvaluationView(r, names[r.project_id]) for r in rows}

    # -- erasure ------------------------------------------------------------
    def erase_results_of_file(self, s: Session, ctx: AuditContext, file_id: str) -> None:
        """Crypto-shred the result files of the evaluations that read ``file_id``, a test file being shredded.

        Registered on :attr:`appliance.files.service.FileService.on_shred`: it runs in the transaction that
        deletes the test file (a user's deletion or retention), so the copies of its records in result files
        go with it. A running evaluation of it is told to stop; the runner keeps nothing of it (the test file
        is no longer live when it finishes).
        """
        rows = s.scalars(select(Evaluation).where(Evaluation.file == file_id)
                         .order_by(Evaluation.id).with_for_update())
        for row in rows:
            self._erase_result(s, ctx, row, f"its test file {file_id} was deleted", {"file": file_id})
        # A result file deleted by hand: its evaluation says so too.
        for row in s.scalars(select(Evaluation).where(Evaluation.result_file == file_id,
                                                      Evaluation.result_erased_at.is_(None)).with_for_update()):
            row.result_erased_at, row.result_erased_reason = utcnow(), "the result file was deleted"

    def erase_results_of_model(self, s: Session, ctx: AuditContext, adapter_id: str, base_model: str) -> None:
        """Crypto-shred the result files of the evaluations that ran ``adapter_id``, a fine-tune being shredded.

        Registered on :attr:`appliance.catalog.service.CatalogService.on_shred`: it runs in the transaction
        that deletes the adapter (a user's deletion, its withdrawal when its training data was erased,
        retention), so its generations go with it.
        """
        # Every evaluation of the base model is locked, not only those with a result file: one finishing now
        # is then seen with its result file (PostgreSQL re-reads a row it waited for), or finishes after
        # this and finds the fine-tune gone.
        rows = s.scalars(select(Evaluation).where(Evaluation.base_model == base_model)
                         .order_by(Evaluation.id).with_for_update())
        for row in rows:
            if adapter_id in (row.models or []):
                self._erase_result(s, ctx, row, f"its model {adapter_id} was deleted", {"model": adapter_id})

    def _erase_result(self, s: Session, ctx: AuditContext, row: Evaluation, reason: str,
                      erased_with: dict[str, str]) -> None:
        if row.status == "running":
            row.cancel_requested = True  # stop reading erased data; the runner keeps no result of it
        if row.result_file is None or row.result_erased_at is not None:
            return
        row.result_erased_at, row.result_erased_reason = utcnow(), reason[:300]  # set first: the shred's hook sees it
        self.files.shred_live(s, ctx, row.result_file, reason=f"evaluation result: {reason}",
                              details={"evaluation_id": row.id, "erased_with": erased_with})

    # -- cancel -------------------------------------------------------------
    def cancel(self, principal: Principal, ctx: AuditContext, evaluation_id: str) -> EvaluationView:
        """A queued evaluation stops at once; a running one is told to stop and ends within seconds."""
        view = self.get(principal, evaluation_id)
        with self.db.transaction() as s:
            row = s.get(Evaluation, evaluation_id, with_for_update=True)
            if row.status in TERMINAL:
                raise ConflictError(f"evaluation {evaluation_id} is already {row.status}", param="evaluation_id")
            if row.status == "running":
                row.cancel_requested = True
            else:
                row.status, row.finished_at = "cancelled", utcnow()
            record(s, ctx, "evaluation.cancel", resource_type="evaluation", resource_id=evaluation_id,
                   project=view.project, details={"status": row.status})
        self.wake()
        return self.get(principal, evaluation_id)


def _bounded(body: dict[str, Any], key: str, default: int, low: int, high: int,
             problems: list[ApplianceError]) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        problems.append(InvalidRequestError(f"`{key}` must be an integer from {low} to {high}; got {value!r}",
                                            param=key))
        return default
    return value


def _raise_all(problems: list[ApplianceError]) -> None:
    """One problem as itself; several as one 400 listing each. A denial is answered alone (it is audited)."""
    if not problems:
        return
    denied = [e for e in problems if isinstance(e, CrossProjectDenied)]
    if denied or len(problems) == 1:
        raise (denied or problems)[0]
    raise InvalidFieldsError([(e.param or "body", e.message) for e in problems])
