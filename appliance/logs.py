"""Structured logging with secret scrubbing.

Log records become one JSON object per line, or a readable line on a terminal
(``APPLIANCE_LOG_FORMAT``: ``auto`` by default, ``json``, ``console``), written to stderr and to
``$APPLIANCE_HOME/logs/appliance.log``. Every record passes :func:`scrub`
first, so a token or key that slips into a message never reaches disk.
Code must still not log secrets; this is the second line of defence.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The patterns live with the error base, in serving (which imports nothing from the appliance).
from serving.redact import scrub

#: Attributes every LogRecord has; anything else was passed through ``extra``.
_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_extras(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return scrub(json.dumps(doc, default=str, ensure_ascii=False))


class ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS LEVEL logger: msg key=value ...`` for humans at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S")
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{ts} {record.levelname:<7} {record.name}: {record.getMessage()} {extras}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return scrub(line)


_HANDLER_NAME = "appliance"
#: Loggers kept at WARNING or above whatever the level: their INFO lines are start-up noise.
QUIET_LIBRARIES = ("alembic.runtime.migration", "presidio-analyzer", "uvicorn.error")


def configure_logging(level: str = "INFO", fmt: str = "auto", log_dir: Path | None = None) -> None:
    """Route the root logger to stderr (and ``log_dir/appliance.log``), scrubbed.

    ``fmt``: ``json``, ``console``, or ``auto``: console when stderr is a terminal (a person running
    ``make run``), JSON otherwise (a service manager or a log collector). Idempotent: calling it
    again replaces the handlers it installed before.
    """
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else ConsoleFormatter()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                log_dir / "appliance.log", maxBytes=50 * 1024 * 1024, backupCount=5, encoding="utf-8"
            )
        )
    for handler in handlers:
        handler.set_name(_HANDLER_NAME)
        # The file handler always writes JSON: it is for machines.
        handler.setFormatter(JsonFormatter() if isinstance(handler, logging.FileHandler) else formatter)
        root.addHandler(handler)
    root.setLevel(level)
    # Libraries' start-up chatter (alembic's migration context, presidio's "Loaded recognizer" per
    # recognizer, uvicorn's "Started server process" beside our own "listening" line) would bury the
    # lines a person starting the server reads; their warnings and errors still come through.
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # Uvicorn's own access log would duplicate ours and include query strings.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
