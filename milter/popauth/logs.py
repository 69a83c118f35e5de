"""structlog set-up: key/value events to stderr, as console lines or JSON.

Every relay decision and every ingest request is logged, so a log line must
cost a few microseconds, not tens: the processors here are lean on purpose
(a timestamp that formats each second once, a plain key=value console
renderer instead of structlog's padded, sorted ConsoleRenderer, which cost
about four times as much per line).

Values come from outside (recipient addresses, user names, client errors),
so both renderers escape control characters, bytes that were not UTF-8 and
the backslash (see :mod:`popauth.escaping`): a log line is one line, and an
ESC sequence in a recipient address never reaches the operator's terminal.

Under systemd (stderr is the journal) each line carries its priority and no
timestamp: see :mod:`popauth.journal`.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import structlog

from popauth.config import LogFormat, LogLevel
from popauth.escaping import escape_text
from popauth.journal import is_journal, with_priority


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
    text = escape_text(str(value))
    if not text or _NEEDS_QUOTES(text):
        # Backslashes are already escaped, so escaping the quote is enough.
        return '"' + text.replace('"', '\\"') + '"'
    return text


def render_console(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
    """``TIMESTAMP LEVEL EVENT key=value ...``; keys without a value are left out."""
    head = f"{event.pop('level', method):<7} {event.pop('event', '')}"
    stamp = event.pop("timestamp", "")
    if stamp:  # none for the journal, which stamps each line itself
        head = f"{stamp} {head}"
    exception = event.pop("exception", None)
    fields = " ".join(
        f"{key}={_console_value(value)}" for key, value in event.items() if value is not None
    )
    line = f"{escape_text(head)} {fields}" if fields else escape_text(head)
    return f"{line}\n{_escape_traceback(exception)}" if exception else line


def _escape_traceback(text: str) -> str:
    """A traceback keeps its lines; anything unsafe inside a line is escaped."""
    return "\n".join(escape_text(line) for line in str(text).split("\n"))


def escape_values(
    logger: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Escape every string value for the JSON renderer, as the console one does."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = _escape_traceback(value) if key == "exception" else escape_text(value)
    return event


class JournalLines:
    """A renderer's text with the journal priority of the event's level on each line."""

    def __init__(self, render: structlog.typing.Processor) -> None:
        self._render = render

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        level = str(event.get("level", method))
        return with_priority(level, str(self._render(logger, method, event)))


def configure_logging(
    log_format: LogFormat, level: LogLevel, journal: bool | None = None
) -> structlog.typing.FilteringBoundLogger:
    """Configure structlog once at start and return the root logger.

    ``journal``: lines for systemd's journal (priorities, no timestamp);
    None decides by whether stderr is the journal.
    """
    if journal is None:
        journal = is_journal(sys.stderr)
    processors: list[structlog.typing.Processor] = [structlog.processors.add_log_level]
    if not journal:
        processors.append(UtcTimestamp())
    processors.append(structlog.processors.format_exc_info)
    renderer: structlog.typing.Processor
    if log_format is LogFormat.JSON:
        processors.append(escape_values)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = render_console
    processors.append(JournalLines(renderer) if journal else renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level.number),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger()
    return logger
