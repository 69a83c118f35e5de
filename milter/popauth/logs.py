"""structlog set-up: key/value events to stderr, as console lines or JSON.

Every relay decision and every ingest request is logged, so a log line must
cost a few microseconds, not tens: the processors here are lean on purpose
(a timestamp that formats each second once, a plain key=value console
renderer instead of structlog's padded, sorted ConsoleRenderer, which cost
about four times as much per line).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class UtcTimestamp:
    """Adds ``timestamp`` as ISO 8601 UTC with milliseconds."""

    def __init__(self) -> None:
        # (second, its formatted prefix), replaced whole: safe across threads.
        self._cached: tuple[int, str] = (-1, "")

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        cached_second, prefix = self._cached
        if second != cached_second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._cached = (second, prefix)
        event["timestamp"] = f"{prefix}.{int((now - second) * 1000):03d}Z"
        return event


_NEEDS_QUOTES = re.compile(r"[\s\"'=]").search


def _console_value(value: Any) -> str:
    text = str(value)
    if not text or _NEEDS_QUOTES(text):
        return json.dumps(text)
    return text


def render_console(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
    """``TIMESTAMP LEVEL EVENT key=value ...``; keys without a value are left out."""
    head = f"{event.pop('timestamp', '')} {event.pop('level', method):<7} {event.pop('event', '')}"
    exception = event.pop("exception", None)
    fields = " ".join(
        f"{key}={_console_value(value)}" for key, value in event.items() if value is not None
    )
    line = f"{head} {fields}" if fields else head
    return f"{line}\n{exception}" if exception else line


def configure_logging(log_format: str, level: str) -> structlog.typing.FilteringBoundLogger:
    """Configure structlog once at start and return the root logger."""
    processors: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        UtcTimestamp(),
        structlog.processors.format_exc_info,
    ]
    if log_format == "json":
        processors.append(structlog.processors.JSONRenderer())
    else:
        processors.append(render_console)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger()
    return logger
