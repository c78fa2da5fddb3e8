"""Bodies of ``/v1/evaluations``."""

from __future__ import annotations

from typing import Annotated

import msgspec

from appliance.evaluations.service import (
    DEFAULT_IMAGES_PER_PROMPT,
    DEFAULT_MAX_TOKENS,
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    MAX_IMAGES_PER_PROMPT,
    MAX_MAX_TOKENS,
    MAX_MODELS,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_STEPS,
)


class EvaluationCreate(msgspec.Struct):
    """Run 1-4 models (a base model and its fine-tunes) on one test file and compare them.

    Text models take ``max_tokens``; image models take ``images_per_prompt``, ``num_inference_steps`` and
    ``seed`` (an option of the other kind is refused). Every problem is reported in one 400: ``param`` names
    the first field, the message lists each.
    """

    file: Annotated[str, msgspec.Meta(description="A scanned test file of the project (uploaded with purpose "
                                                  "`evals`).")]
    models: Annotated[list[str], msgspec.Meta(min_length=1, max_length=MAX_MODELS, description=(
        "Base model names or fine-tuned model ids, all on one base model."))]
    samples: Annotated[int, msgspec.Meta(ge=0, le=MAX_SAMPLES, description=(
        "Prompts whose generations (answers or images) are kept side by side (in the encrypted result "
        "file)."))] = DEFAULT_SAMPLES
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_MAX_TOKENS, description=(
        f"Text models only: most tokens per generated answer (greedy); {DEFAULT_MAX_TOKENS} when left "
        "out."))] | None = None
    images_per_prompt: Annotated[int, msgspec.Meta(ge=1, le=MAX_IMAGES_PER_PROMPT, description=(
        f"Image models only: images generated per prompt and model; {DEFAULT_IMAGES_PER_PROMPT} when left "
        "out."))] | None = None
    num_inference_steps: Annotated[int, msgspec.Meta(ge=1, le=MAX_STEPS, description=(
        f"Image models only: denoising steps per image; {DEFAULT_STEPS} when left out."))] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED, description=(
        "Image models only: image k of prompt j is generated with seed + j * images_per_prompt + k, the same "
        f"for every model; {DEFAULT_SEED} when left out."))] | None = None


class EvaluationError(msgspec.Struct):
    code: str
    message: str
    param: str | None = None


class ModelResult(msgspec.Struct):
    """One model's figures on the test file (no text, no images).

    Text models: ``loss`` to ``token_f1``; ``loss`` and ``perplexity`` are None when not measured (the file
    had no target tokens: every answer cut away at the model's context), ``exact_match`` and ``token_f1``
    when no record has a reference answer. Image models: ``prompts``, ``images`` and ``clip_t`` (the mean
    cosine similarity of each prompt's CLIP text embedding with its images' CLIP image embeddings, over
    every prompt); ``clip_t`` is None without a CLIP evaluator (the evaluation's ``fidelity`` says why).
    """

    model: str
    loss: float | None = None
    perplexity: float | None = None
    records: int | None = None
    target_tokens: int | None = None
    answered: int | None = None
    exact_match: float | None = None
    token_f1: float | None = None
    prompts: int | None = None
    images: int | None = None
    clip_t: float | None = None


class ImageSettings(msgspec.Struct):
    """How an image evaluation generates: images per prompt, denoising steps, the seed shared by every model."""

    images_per_prompt: int
    num_inference_steps: int
    seed: int


class Fidelity(msgspec.Struct):
    """How an image evaluation's CLIP-T was measured (``evaluators`` names the CLIP model), or why it was not."""

    metric: str
    evaluators: dict[str, str] | None = None


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
    results: list[ModelResult]
    project: str
    #: the base model's kind: ``llm`` (text) or ``diffusion`` (image)
    kind: str = "llm"
    #: text models
    max_tokens: int | None = None
    #: image models
    images: ImageSettings | None = None
    #: image models, once run
    fidelity: Fidelity | None = None
    started_at: int | None = None
    finished_at: int | None = None
    error: EvaluationError | None = None
    #: the generations side by side: a file whose content only roles that may read file content read
    result_file: str | None = None
    #: when the result file was crypto-shredded with its test file or one of its fine-tunes (``result_file``
    #: names it, deleted), and why; the figures stay
    result_erased_at: int | None = None
    result_erased_reason: str | None = None
    #: while running: how far it is (None before the worker's first report and once it ended)
    progress: EvaluationProgress | None = None
    object: str = "evaluation"


class EvaluationList(msgspec.Struct):
    data: list[EvaluationObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
    object: str = "list"


