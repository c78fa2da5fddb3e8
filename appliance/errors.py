"""The domain exception tree.

Services raise these; :mod:`appliance.server.errors` maps them to HTTP in one
place and the CLI maps them to exit codes. Messages never contain a secret, a
token or raw personal data: they name the argument and, where safe, the value.
"""

from __future__ import annotations

from serving.errors import (
    MODEL_NAME_LIKE,
    ROLE_LIKE,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    ServingError,
    echo,
)

__all__ = [
    "MODEL_NAME_LIKE", "ROLE_LIKE", "ApplianceError", "AuditChainError", "AuthenticationError", "ConflictError",
    "CrossProjectDenied", "InsufficientStorageError", "InvalidRequestError", "NotFoundError", "NotInitializedError",
    "PayloadTooLargeError", "PermissionDeniedError", "PolicyViolationError", "RateLimitedError", "SettingsError",
    "echo",
]

#: Base of every error the appliance raises on purpose: the serving base itself, so that one tree holds
#: the engines' errors and the appliance's, ``except ApplianceError`` catches both, and one handler maps them.
#: ``message`` (scrubbed), ``param`` (the request field, CLI option or setting at fault) and ``code``
#: (stable, machine-readable) as documented on :class:`serving.errors.ServingError`.
#: :class:`InvalidRequestError` (400), :class:`NotFoundError` (404) and :class:`ConflictError` (409)
#: are defined in :mod:`serving.errors` too, as the engines raise them.
ApplianceError = ServingError


class SettingsError(ApplianceError):
    """The environment holds invalid ``APPLIANCE_*`` settings (all problems at once)."""

    code = "invalid_settings"

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings:\n  " + "\n  ".join(problems))


class NotInitializedError(ApplianceError):
    """The home directory has not been set up with ``appliance init``."""

    code = "not_initialized"


class InvalidFieldsError(InvalidRequestError):
    """Several fields of one request are wrong: ``problems`` lists each as ``(param, message)``.

    The message lists them all (``"param: message; param: message"``); ``param``
    names the first. Hyperparameter errors have this shape, and so does job creation.
    """

    def __init__(self, problems: list[tuple[str, str]], *, code: str | None = None) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems), param=problems[0][0], code=code)


class InvalidLinesError(InvalidRequestError):
    """Several lines of an uploaded file are not valid records, all found in one pass.

    ``problems`` lists the first :data:`MAX_REPORTED_LINES` as ``(param, message)`` (``param``:
    ``line N`` or ``line N: <field>``; each message starts with its line); ``total`` counts them all.
    The message is the one problem's, or a count followed by the first ten; ``param`` names the first.
    """

    MAX_REPORTED_LINES = 100

    def __init__(self, problems: list[tuple[str, str]], total: int) -> None:
        self.problems, self.total = problems[: self.MAX_REPORTED_LINES], total
        if total == 1:
            message = problems[0][1]
        else:
            shown = "; ".join(m for _, m in problems[:10])
            more = f"; and {total - 10} more" if total > 10 else ""
            message = f"{total} lines are not valid records: {shown}{more}"
        super().__init__(message, param=problems[0][0])


class AuthenticationError(ApplianceError):
    """No valid credential was presented (HTTP 401)."""

    code = "invalid_token"


class PermissionDeniedError(ApplianceError):
    """The caller is authenticated but its role may not do this (HTTP 403)."""

    code = "permission_denied"


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
