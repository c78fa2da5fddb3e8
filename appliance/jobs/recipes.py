"""Which training methods a job may name, and their validation (cheap: no torch)."""

from __future__ import annotations

from typing import Any

from appliance.errors import InvalidRequestError

LLM_METHODS = ("lora", "qlora")
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
    if base_kind != "llm":
        raise InvalidRequestError(f"base models of kind {base_kind!r} cannot be fine-tuned yet", param="model")
    if isinstance(method, dict) and seed is not None:
        kind = method.get("type", "lora")
        body = dict(method.get(kind) or {})
        hp = dict(body.get("hyperparameters") or {})
        if "seed" in hp and hp["seed"] != seed:
            raise InvalidRequestError(
                f"`seed` ({seed}) and `method.{kind}.hyperparameters.seed` ({hp['seed']!r}) disagree; give one",
                param="seed",
            )
        hp["seed"] = seed
        method = {**method, kind: {**body, "hyperparameters": hp}}
    spec = TrainingSpec.from_method(method)
    return spec.method, spec.hyperparameters.to_dict()
