"""Helpers shared by the command modules: settings, audit context, error handling, durations."""

from __future__ import annotations

import functools
import getpass
import re
import sys
from datetime import timedelta
from typing import Any

import click

from appliance.audit.service import AuditContext
from appliance.bootstrap import open_initialized
from appliance.errors import ApplianceError, InvalidRequestError
from appliance.identity.service import IdentityService
from appliance.settings import Settings, load_settings


def _ctx() -> AuditContext:
    return AuditContext.cli(getpass.getuser())


def _settings() -> Settings:
    return load_settings()


def handle_errors(fn):
    """Turn domain errors into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApplianceError as exc:
            where = f" ({exc.param})" if exc.param else ""
            click.echo(f"error{where}: {exc.message}", err=True)
            sys.exit(2)

    return wrapper


def _identity(settings: Settings) -> IdentityService:
    return IdentityService(open_initialized(settings))


_DURATION_RE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(value: str, *, param: str) -> timedelta:
    """``30d``, ``12h``, ``90m``... as a timedelta; an error naming ``param`` otherwise."""
    match = _DURATION_RE.match(value.strip())
    if not match or int(match.group(1)) == 0:
        raise InvalidRequestError(
            f"`{param}` must be a positive number followed by s, m, h, d or w (e.g. 30d); got {value!r}",
            param=param,
        )
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
