"""Bodies of ``/v1/evaluations``."""

from __future__ import annotations

from typing import Annotated

import msgspec

from appliance.evaluations.service import DEFAULT_MAX_TOKENS, DEFAULT_SAMPLES, MAX_MAX_TOKENS, MAX_MODELS, MAX_SAMPLES


class EvaluationCreate(msgspec.Struct):
    """Run 1-4 models (a base model and its fine-tunes) on one test file and compare them.

    Every problem is reported in one 400: ``param`` names the first field, the message lists each.
    """

    file: Annotated[str, msgspec.Meta(description="A scanned test file of the project (uploaded with purpose "
                                                  "`evals`).")]
    models: Annotated[list[str], msgspec.Meta(min_length=1, max_length=MAX_MODELS, description=(
        "Base model names or fine-tuned model ids, all on one base model."))]
    samples: Annotated[int, msgspec.Meta(ge=0, le=MAX_SAMPLES, description=(
        "Prompts whose generations are kept side by side (in the encrypted result file)."))] = DEFAULT_SAMPLES
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_MAX_TOKENS, description=(
        "Most tokens per generated answer (greedy)."))] = DEFAULT_MAX_TOKENS


class EvaluationError(msgspec.Struct):
    code: str
    message: str
    param: str | None = None


class ModelResult(msgspec.Struct):
    """One model's figures on the test file (no text)."""

    model: str
    loss: float
    perplexity: float
    records: int
    target_tokens: int
    answered: int
    exact_match: float | None = None
    token_f1: float | None = None


class EvaluationProgress(msgspec.Struct):
    """How far a running evaluation is: model ``model`` of ``models``, ``done`` of ``total`` in its phase
    (``loss``: records through the loss pass; ``answers``: prompts answered) and the phase's seconds left."""

    model: int
    models: int
    phase: str
    done: int
    total: int
    seconds_left: float | None = None


class EvaluationObject(msgspec.Struct):
    id: str
    created_at: int
    status: str
    file: str
    models: list[str]
    base_model: str
    samples: int
    max_tokens: int
    results: list[ModelResult]
    project: str
    started_at: int | None = None
    finished_at: int | None = None
    error: EvaluationError | None = None
    #: the generations side by side: a file whose content only roles that may read file content read
    result_file: str | None = None
    #: while running: how far it is (None before the worker's first report and once it ended)
    progress: EvaluationProgress | None = None
    object: str = "evaluation"


class EvaluationList(msgspec.Struct):
    data: list[EvaluationObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
    object: str = "list"


