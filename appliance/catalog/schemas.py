"""Bodies of ``/v1/models``."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec


class ModelObject(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    parent: str | None
    root: str
    kind: str
    manifest: dict[str, Any] | None = None
    max_model_len: int | None = None
    #: base models: their card (the licence their source states, parameters, stored size)
    license: str | None = None
    parameters: int | None = None
    size_bytes: int | None = None
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelObject]
    object: str = "list"


class ModelDeleted(msgspec.Struct):
    id: str
    deleted: bool = True
    object: str = "model"


# -- /v1/model_imports -------------------------------------------------------------


class ModelImportCreate(msgspec.Struct):
    """``POST /v1/model_imports``: what to import from the import directory, and its name in the store."""

    source: Annotated[str, msgspec.Meta(
        description="Path of a Hugging Face model directory (sharded safetensors included), a .gguf file, a "
                    "diffusers pipeline, a single-file Stable Diffusion 1.x/2.x/SDXL .safetensors checkpoint, or a "
                    "CLIPModel/ViTModel/Dinov2Model folder (a fidelity evaluator for image jobs), relative to the import directory (APPLIANCE_MODEL_IMPORT_DIR).")]
    model: Annotated[str, msgspec.Meta(
        description="The base model's name in the store (and in /v1/models): letters, digits, '.', '_', '-'.")]


class ModelImportEvent(msgspec.Struct):
    created_at: int
    message: str


class ModelImportObject(msgspec.Struct):
    """An import: running, succeeded (the model is in ``/v1/models``) or failed (``error`` says why)."""

    id: str
    model: str
    source: str
    status: str
    created_by: str
    created_at: int
    finished_at: int | None
    error: dict[str, Any] | None
    events: list[ModelImportEvent]
    object: str = "model.import"


class ModelImportList(msgspec.Struct):
    data: list[ModelImportObject]
    object: str = "list"
