"""The domain exception tree.

Services raise these; :mod:`appliance.server.errors` maps them to HTTP in one
place and the CLI maps them to exit codes. Messages never contain a secret, a
token or raw personal data: they name the argument and, where safe, the value.
"""

from __future__ import annotations

import re
from typing import Any

from appliance.logs import scrub

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


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose.

    Args:
        message: A sentence for the user saying what is wrong and how to fix it.
        param: The request field, CLI option or setting at fault, if any.
        code: A stable machine-readable code; defaults to the class's.
    """

    code: str = "error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        # Defence in depth: a value echoed back may be a pasted secret.
        message = scrub(message)
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class SettingsError(ApplianceError):
    """The environment holds invalid ``APPLIANCE_*`` settings (all problems at once)."""

    code = "invalid_settings"

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings:\n  " + "\n  ".join(problems))


class NotInitializedError(ApplianceError):
    """The home directory has not been set up with ``appliance init``."""

    code = "not_initialized"


class InvalidRequestError(ApplianceError):
    """The input is malformed or breaks a rule (HTTP 400)."""

    code = "invalid_request"


class InvalidFieldsError(InvalidRequestError):
    """Several fields of one request are wrong: ``problems`` lists each as ``(param, message)``.

    The message lists them all (``"param: message; param: message"``); ``param``
    names the first. Hyperparameter errors have this shape, and so does job creation.
    """

    def __init__(self, problems: list[tuple[str, str]], *, code: str | None = None) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems), param=problems[0][0], code=code)


class AuthenticationError(ApplianceError):
    """No valid credential was presented (HTTP 401)."""

    code = "invalid_token"


class PermissionDeniedError(ApplianceError):
    """The caller is authenticated but its role may not do this (HTTP 403)."""

    code = "permission_denied"


class NotFoundError(ApplianceError):
    """The resource does not exist *for this caller* (HTTP 404)."""

    code = "not_found"


class CrossProjectDenied(NotFoundError):
    """The resource exists in another project.

    Answered exactly like :class:`NotFoundError` so that its existence does not
    leak, but audited as a denial.
    """


class PolicyViolationError(InvalidRequestError):
    """Content breaks the project's data policy (HTTP 422); ``details`` is the scan summary."""

    code = "policy_violation"

    def __init__(self, message: str, *, param: str | None = None, details: dict | None = None) -> None:
        super().__init__(message, param=param)
        self.details = details or {}


class ConflictError(ApplianceError):
    """The request clashes with existing state, e.g. a duplicate name (HTTP 409)."""

    code = "conflict"


class PayloadTooLargeError(ApplianceError):
    """The request body is over a configured limit (HTTP 413)."""

    code = "payload_too_large"


class InsufficientStorageError(ApplianceError):
    """The disk holding the data directory is full, or a file size limit was hit (HTTP 507)."""

    code = "insufficient_storage"


class RateLimitedError(ApplianceError):
    """Too many failed attempts from one origin (HTTP 429)."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AuditChainError(ApplianceError):
    """The audit log's hash chain does not verify."""

    code = "audit_chain_broken"

    def __init__(self, message: str, *, seq: int) -> None:
        super().__init__(message)
        self.seq = seq
