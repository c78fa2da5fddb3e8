"""Names of base models in the store (``/v1/models`` ids)."""

from __future__ import annotations

import re

from appliance.errors import InvalidRequestError

_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_model_name(name: str, *, param: str = "name") -> str:
    """``name`` if it is 1-128 letters, digits, '.', '_' or '-' starting with a letter or digit; else a 400."""
    if not isinstance(name, str) or not _MODEL_NAME_RE.match(name):
        raise InvalidRequestError(
            f"`{param}` must be 1-128 characters of letters, digits, '.', '_' or '-'; got {name!r}", param=param
        )
    return name
