"""Which training methods a job may name, and their validation (cheap: no torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from appliance.errors import InvalidRequestError

if TYPE_CHECKING:
    from appliance.trainkit.registry import RecipeCapabilities, RecipeRegistry

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

    if isinstance(method, dict) and isinstance(method.get("type"), str) and method["type"] in ALIASES:
        alias = method["type"]
        method = {"type": ALIASES[alias], ALIASES[alias]: method.get(alias) or {}}
    if base_kind == "diffusion":
        from appliance.diffusion import ImageTrainingSpec

        if isinstance(method, dict) and seed is not None:
            method = _with_seed(method, seed)
        image_spec = ImageTrainingSpec.from_method(method)
        hp = image_spec.hyperparameters
        if hp.train_text_encoder is True and image_spec.method in ("lora", "dreambooth_lora"):
            _check_text_encoder_lora(image_spec.method)
        return image_spec.method, hp.to_dict()
    if base_kind != "llm":
        raise InvalidRequestError(f"base models of kind {base_kind!r} cannot be fine-tuned", param="model")
    if isinstance(method, dict) and seed is not None:
        method = _with_seed(method, seed)
    spec = TrainingSpec.from_method(method)
    return spec.method, spec.hyperparameters.to_dict()


def _check_text_encoder_lora(method: str) -> None:
    """Refuse text-encoder LoRA at creation where this appliance's transformers/peft pair cannot attach it
    (the worker would refuse it at the start of the run; a person should hear it now, at the field)."""
    from appliance.diffusion.compat import text_encoder_lora_supported

    supported, why = text_encoder_lora_supported()
    if not supported:
        raise InvalidRequestError(f"`train_text_encoder` with LoRA is not available on this appliance: {why}; set "
                                  "it to false (or use full DreamBooth, which trains the text encoder whole)",
                                  param=f"method.{method}.hyperparameters.train_text_encoder")


def capabilities(base_kind: str, method: str) -> RecipeCapabilities | None:
    """What ``method`` declares it supports on a base model of ``base_kind``; ``None`` for an unknown pair.

    Read from the modality's recipe registry without loading torch.
    """
    registry = registry_of(base_kind)
    if registry is None or method not in registry.methods:
        return None
    return registry.capabilities(method)


def registry_of(base_kind: str) -> RecipeRegistry | None:
    """The recipe registry of a kind of base model (``llm``, ``diffusion``); ``None`` for another kind."""
    if base_kind == "llm":
        from appliance.training.registry import REGISTRY

        return REGISTRY
    if base_kind == "diffusion":
        from appliance.diffusion.registry import REGISTRY as IMAGE_REGISTRY

        return IMAGE_REGISTRY
    return None


def _with_seed(method: dict[str, Any], seed: int) -> dict[str, Any]:
    """The method with the job's ``seed`` in its hyperparameters (an explicit different one is an error)."""
    kind = method.get("type", "lora")
    body = (method.get(kind) or {}) if isinstance(kind, str) else None
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
