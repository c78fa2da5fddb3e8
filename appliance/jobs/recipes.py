"""Which training methods a job may name, and their validation (cheap: no torch)."""

from __future__ import annotations

from typing import Any

from appliance.errors import InvalidRequestError

LLM_METHODS = ("lora", "qlora")
IMAGE_METHODS = ("lora", "dreambooth", "dreambooth_lora")
#: The file purpose each kind of base model trains on.
DATASET_PURPOSE = {"llm": "fine-tune", "diffusion": "fine-tune-images"}
#: OpenAI's name for plain supervised fine-tuning; here it means LoRA.
ALIASES = {"supervised": "lora"}


def validate_method(method: Any, *, base_kind: str, seed: int | None = None) -> tuple[str, dict[str, Any]]:
    """``(method type, hyperparameters as stored)`` for a job's ``method`` object.

    Every problem in the hyperparameters is reported at once, each naming its
    field (``method.lora.hyperparameters.lora_r``) and the value received.
    """
    from appliance.training import TrainingSpec

    if isinstance(method, dict) and method.get("type") in ALIASES:
        alias = method["type"]
        method = {"type": ALIASES[alias], ALIASES[alias]: method.get(alias) or {}}
    if base_kind == "diffusion":
        from appliance.diffusion import ImageTrainingSpec

        if isinstance(method, dict) and seed is not None:
            method = _with_seed(method, seed)
        image_spec = ImageTrainingSpec.from_method(method)
        return image_spec.method, image_spec.hyperparameters.to_dict()
    if base_kind != "llm":
        raise InvalidRequestError(f"base models of kind {base_kind!r} cannot be fine-tuned", param="model")
    if isinstance(method, dict) and seed is not None:
        method = _with_seed(method, seed)
    spec = TrainingSpec.from_method(method)
    return spec.method, spec.hyperparameters.to_dict()


def _with_seed(method: dict[str, Any], seed: int) -> dict[str, Any]:
    """The method with the job's ``seed`` in its hyperparameters (an explicit different one is an error)."""
    kind = method.get("type", "lora")
    body = method.get(kind) or {}
    if not isinstance(body, dict):
        return method  # the recipe's parser names this problem
    hp = dict(body.get("hyperparameters") or {})
    if "seed" in hp and hp["seed"] != seed:
        raise InvalidRequestError(
            f"`seed` ({seed}) and `method.{kind}.hyperparameters.seed` ({hp['seed']!r}) disagree; give one",
            param="seed",
        )
    hp["seed"] = seed
    return {**method, kind: {**body, "hyperparameters": hp}}
