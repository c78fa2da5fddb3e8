"""Errors the serving engines raise, on top of :mod:`appliance.errors`.

Unknown adapter and broken adapter are distinct on purpose (vLLM answers 404
and 400): a client that names a model that does not exist must not be told
that something failed to load, and an operator must see a load failure as such.
"""

from __future__ import annotations

from typing import Any

from appliance.errors import MODEL_NAME_LIKE, ROLE_LIKE, ApplianceError, InvalidRequestError, NotFoundError, echo

__all__ = [
    "MODEL_NAME_LIKE", "ROLE_LIKE", "AdapterLoadError", "AdapterNotFoundError", "EngineError", "InvalidRequestError",
    "NoReplicaError", "echo", "model_not_found",
]


def model_not_found(name: Any) -> AdapterNotFoundError:
    """The 404 for a request naming a model that is neither the base model nor a loaded adapter."""
    return AdapterNotFoundError(f"the model {echo(name, MODEL_NAME_LIKE)} does not exist", param="model")


class AdapterNotFoundError(NotFoundError):
    """The request names a model that is neither the base model nor a loaded adapter (HTTP 404)."""

    code = "model_not_found"


class AdapterLoadError(ApplianceError):
    """An adapter was rejected by validation or failed to load; the engine serves what it served before.

    Map to HTTP 400 when a client supplied the adapter (vLLM does), to 500 when
    an adapter the appliance stores could not be reloaded.
    """

    code = "adapter_load_failed"


class EngineError(ApplianceError):
    """The engine failed while generating, or the vLLM server could not be reached (HTTP 502/503)."""

    code = "engine_error"


class NoReplicaError(EngineError):
    """No serving replica is up to take the request (HTTP 503): every one failed or is unreachable."""

    code = "no_replica_available"
