"""The serving errors: one small exception tree, and the one builder of an error body.

:class:`ServingError` is the base of every error raised on purpose, by the
engines and by the appliance alike: :mod:`appliance.errors` builds its tree on
it (``ApplianceError`` *is* :class:`ServingError`), so ``except ApplianceError``
still catches what an engine raises, and the control plane's one exception
handler (:mod:`appliance.server.errors`) maps both to HTTP. Serving imports
nothing from the appliance.

Every error carries a stable ``code``, the HTTP ``status`` and OpenAI error
``error_type`` it is answered with by default, the request field at fault
(``param``) and a ``message`` (secret-shaped substrings scrubbed).

Unknown adapter and broken adapter are distinct on purpose (vLLM answers 404
and 400): a client that names a model that does not exist must not be told
that something failed to load, and an operator must see a load failure as such.

:func:`error_body` is the only place an error body (``{"error": {...}}``) is
built; the control plane's handler and the standalone vLLM-compatible server
(:mod:`serving.vllm_server`, which runs without the control plane) both use it.
``tests/unit/test_layering.py`` fails on a body built anywhere else.
"""

from __future__ import annotations

import re
from typing import Any

from serving.redact import scrub

__all__ = [
    "MODEL_NAME_LIKE", "ROLE_LIKE", "AdapterLoadError", "AdapterNotFoundError", "ConflictError", "EngineError",
    "InvalidRequestError", "NoReplicaError", "NotFoundError", "ServerConfigError", "ServingError", "echo",
    "error_body",
    "model_not_found", "unauthorized_body",
]

#: What model names look like (``tiny-llama``, ``ft:base:project:suffix:ftjob-...``).
MODEL_NAME_LIKE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,199}$")
ROLE_LIKE = re.compile(r"^[A-Za-z_-]{1,20}$")


def echo(value: Any, like: re.Pattern[str]) -> str:
    """``value`` quoted for an error message if it looks like what was expected, else only its size.

    A client may put anything in any field (an address, a card number, a
    prompt): error bodies end up in client logs and proxies, so a value that
    does not look like an identifier is never repeated back.
    """
    if isinstance(value, str) and like.match(value):
        return repr(value)
    if isinstance(value, str):
        return f"a {len(value)}-character string (not shown)"
    return f"a value of type {type(value).__name__}"


class ServingError(Exception):
    """Base of every error raised on purpose (the appliance's ``ApplianceError`` is this class).

    Args:
        message: A sentence for the user saying what is wrong and how to fix it.
        param: The request field, CLI option or setting at fault, if any.
        code: A stable machine-readable code; defaults to the class's.

    ``status`` and ``error_type`` are what the control plane answers when its
    handler has no more specific mapping for the class.
    """

    code: str = "error"
    status: int = 500
    error_type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        # Defence in depth: a value echoed back may be a pasted secret.
        message = scrub(message)
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(ServingError):
    """The input is malformed or breaks a rule (HTTP 400)."""

    code = "invalid_request"
    status = 400
    error_type = "invalid_request_error"


class NotFoundError(ServingError):
    """The resource does not exist *for this caller* (HTTP 404)."""

    code = "not_found"
    status = 404
    error_type = "not_found_error"


class ConflictError(ServingError):
    """The request clashes with existing state, e.g. a duplicate name (HTTP 409)."""

    code = "conflict"
    status = 409
    error_type = "conflict_error"


def model_not_found(name: Any) -> AdapterNotFoundError:
    """The 404 for a request naming a model that is neither the base model nor a loaded adapter."""
    return AdapterNotFoundError(f"the model {echo(name, MODEL_NAME_LIKE)} does not exist", param="model")


class AdapterNotFoundError(NotFoundError):
    """The request names a model that is neither the base model nor a loaded adapter (HTTP 404)."""

    code = "model_not_found"


class AdapterLoadError(ServingError):
    """An adapter was rejected by validation or failed to load; the engine serves what it served before.

    HTTP 400 when a client supplied the adapter (vLLM answers so); an adapter
    the appliance stores that could not be reloaded is logged by the caller.
    """

    code = "adapter_load_failed"
    # A broken adapter is the request's problem (as vLLM answers), an engine failure ours.
    status = 400
    error_type = "invalid_request_error"


class EngineError(ServingError):
    """The engine failed while generating, or the vLLM server could not be reached (HTTP 502)."""

    code = "engine_error"
    status = 502
    error_type = "server_error"


class ServerConfigError(EngineError):
    """A vLLM server answers but is set up so that it cannot serve adapters (HTTP 502).

    Runtime LoRA updating is off, the api key is wrong, or it cannot see the
    appliance's tmpfs. Not an outage (the replica is not marked down) and not a
    broken adapter: the message says which, and what to change.
    """

    code = "serving_misconfigured"


class NoReplicaError(EngineError):
    """No serving replica is up to take the request (HTTP 503): every one failed or is unreachable."""

    code = "no_replica_available"
    status = 503


def error_body(code: str | int, message: str, param: str | None, error_type: str) -> dict[str, Any]:
    """The one error body: ``{"error": {"code", "message", "param", "type"}}`` (OpenAI's shape).

    ``code`` is the error's stable code in the control plane's answers; vLLM's
    dialect (:mod:`serving.vllm_server`, the runtime-LoRA routes) puts the HTTP
    status there, as vLLM does. The message is scrubbed of secret-shaped text.
    """
    return {"error": {"code": code, "message": scrub(message), "param": param, "type": error_type}}


def unauthorized_body() -> dict[str, Any]:
    """vLLM's answer to a missing or wrong ``--api-key`` bearer token (401): ``{"error": "Unauthorized"}``."""
    return {"error": "Unauthorized"}
