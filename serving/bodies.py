"""Request bodies documented by a msgspec struct, checked field by field by the handler.

Used by the stand-in vLLM server and by the control plane's controllers alike (both are Litestar apps).

Litestar decodes a ``data: SomeStruct`` body itself and stops at the first
problem (and, converting leniently, takes ``"3"`` for an integer). A route that
reports every problem at once, or that answers its own messages, declares
``dto=documented_body(SomeStruct), return_dto=None``: the OpenAPI document shows
``SomeStruct`` as the request body, and the handler receives the JSON object
(a ``dict``) to check field by field. A body that is not a JSON object fails as
it does for a ``dict`` body, with Litestar's own validation error.
``documented_body(SomeStruct, raw=True)`` hands the body's bytes as received, for
handlers with their own parser (chat and text completions).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import msgspec
from litestar.datastructures import URL
from litestar.dto import AbstractDTO
from litestar.exceptions import ValidationException
from litestar.typing import FieldDefinition

__all__ = ["documented_body"]


class _DocumentedBody(AbstractDTO[Any]):
    """The DTO behind :func:`documented_body` (``model_type`` is the documented struct)."""

    model_type: Any
    raw: bool = False

    @classmethod
    def generate_field_definitions(cls, model_type: type[Any]) -> Generator[Any, None, None]:
        raise NotImplementedError  # pragma: no cover - only the methods below are used

    @classmethod
    def detect_nested_field(cls, field_definition: FieldDefinition) -> bool:
        return False

    @classmethod
    def create_for_field_definition(cls, field_definition: FieldDefinition, handler_id: str,
                                    backend_cls: Any = None) -> None:
        """Nothing to build: the body is decoded as JSON, not transferred through a model."""

    @classmethod
    def create_openapi_schema(cls, field_definition: FieldDefinition, handler_id: str, schema_creator: Any) -> Any:
        return schema_creator.for_field_definition(
            FieldDefinition.from_annotation(cls.model_type, kwarg_definition=field_definition.kwarg_definition))

    def decode_bytes(self, value: bytes) -> Any:
        if self.raw:
            return value
        # The app's before_request hook has already answered bodies that are not JSON.
        return self.decode_builtins(msgspec.json.decode(value))

    def decode_builtins(self, value: Any) -> dict[str, Any]:
        try:
            return msgspec.convert(value, dict[str, Any])
        except msgspec.ValidationError as exc:
            # As Litestar words a ``data: dict[str, Any]`` that is not an object.
            connection = self.asgi_connection
            path = URL.from_components(path=connection.url.path, query=connection.url.query)
            raise ValidationException(
                detail=f"Validation failed for {connection.method} {path}",
                extra=[{"message": str(exc).split(" - ", maxsplit=1)[0], "key": "data", "source": "body"}],
            ) from None


def documented_body(model: type[msgspec.Struct], *, raw: bool = False) -> type[AbstractDTO[Any]]:
    """A ``dto=`` for a handler whose ``data`` is the JSON object that ``model`` documents.

    Args:
        model: The struct the OpenAPI document shows as the request body.
        raw: Hand the handler the body's bytes, not the decoded object.
    """
    return type(f"DocumentedBody[{model.__name__}]", (_DocumentedBody,), {"model_type": model, "raw": raw})
