"""Structured logs: one event per line on stdout (JSON or logfmt), for journald.

Call sites use :func:`log_event` with a stable event name and fields; secrets are never passed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

_FIELDS_ATTR = "webhookd_fields"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}  # fmt: skip


def log_event(
    logger: logging.Logger,
    level: int,
    event: str,
    *,
    exc_info: BaseException | None = None,
    **fields: Any,
) -> None:
    """Log ``event`` with ``fields`` (None values are left out)."""
    if logger.isEnabledFor(level):
        clean = {k: v for k, v in fields.items() if v is not None}
        logger.log(level, event, exc_info=exc_info, extra={_FIELDS_ATTR: clean})


class _Formatter(logging.Formatter):
    def __init__(self, style: str) -> None:
        super().__init__()
        self._style_name = style

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        fields.update(getattr(record, _FIELDS_ATTR, {}))
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        if self._style_name == "json":
            return json.dumps(fields, default=str, ensure_ascii=False)
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in fields.items())


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(c in text for c in ' ="\\\n') and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)


_LATEST_ISO_SECONDS = 253402300799.0  # 9999-12-31T23:59:59Z


def iso_time(ts: float) -> str:
    """A Unix time for a log field, in UTC ISO-8601; a time beyond what ISO-8601 can write is
    shown as the latest it can."""
    return datetime.fromtimestamp(min(ts, _LATEST_ISO_SECONDS), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_configured = ("info", "json")  # (level, format) of the last configure()


def current() -> tuple[str, str]:
    """The level and format :func:`configure` set last (a child process logs the same way)."""
    return _configured


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Route the ``webhookd`` loggers to ``stream`` (stdout) in the chosen format."""
    global _configured
    _configured = (level, fmt)
    root = logging.getLogger("webhookd")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(_Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    root.propagate = False
