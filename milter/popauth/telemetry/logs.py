"""structlog set-up: key/value events to stderr, as console lines or JSON.

Every relay decision and every ingest request is logged, so a log line must
cost a few microseconds, not tens: the processors here are lean on purpose
(a timestamp that formats each second once, a plain key=value console
renderer instead of structlog's padded, sorted ConsoleRenderer, which cost
about four times as much per line).

Values come from outside (recipient addresses, user names, client errors),
so both renderers escape control characters, bytes that were not UTF-8 and
the backslash (see :mod:`popauth.basics.escaping`): a log line is one line, and an
ESC sequence in a recipient address never reaches the operator's terminal.

Under systemd (stderr is the journal) each line carries its priority and no
timestamp: see :mod:`popauth.telemetry.journal`.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from popauth.basics.escaping import escape_text
from popauth.telemetry.journal import is_journal, with_priority
from popauth.telemetry.levels import LogFormat, LogLevel


class UtcTimestamp:
    """Adds ``timestamp`` as ISO 8601 UTC with milliseconds."""

    def __init__(self) -> None:
        # (second, its formatted prefix), replaced whole: safe across threads.
        self._cached: tuple[int, str] = (-1, "")
        # (millisecond, its whole timestamp): lines come in bursts.
        self._last: tuple[int, str] = (-1, "")

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event["timestamp"] = self.now()
        return event

    def now(self) -> str:
        millisecond = time.time_ns() // 1_000_000
        last, stamp = self._last
        if millisecond == last:
            return stamp
        second, rest = divmod(millisecond, 1000)
        cached_second, prefix = self._cached
        if second != cached_second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._cached = (second, prefix)
        stamp = f"{prefix}.{rest:03d}Z"
        self._last = (millisecond, stamp)
        return stamp


_NEEDS_QUOTES = re.compile(r"[\s\"'=]").search
_LEVELS = {"warn": "warning", "exception": "error"}


def _console_value(value: Any) -> str:
    text = escape_text(str(value))
    if not text or _NEEDS_QUOTES(text):
        # Backslashes are already escaped, so escaping the quote is enough.
        return '"' + text.replace('"', '\\"') + '"'
    return text


def _shown_as_is(text: str, fields: int) -> bool:
    """Whether ``EVENT key=value ...`` (``fields`` pairs) needs no escape and no quotes.

    Printable text holds none of the characters :func:`escape_text` escapes
    but the backslash, and no whitespace but the blank; counting blanks and
    equals signs tells that none is inside a name or a value, and an equals
    sign before a blank or at the end is an empty value. Plain string
    methods, no regular expression: this runs for every line.
    """
    return (
        text.isprintable()
        and text.count(" ") == fields
        and text.count("=") == fields
        and "\\" not in text
        and '"' not in text
        and "'" not in text
        and "= " not in text
        and not text.endswith("=")
    )


class ConsoleRenderer:
    """The whole console chain in one processor: ``TIMESTAMP LEVEL EVENT key=value ...``.

    Keys without a value are left out. Level, timestamp and traceback are
    added here rather than by separate processors, and a line whose names
    and values hold nothing to escape or quote (nearly all) is checked and
    joined in one go: a decision line is written for every message.
    """

    def __init__(self, *, timestamps: bool = True) -> None:
        # None: no timestamp (the journal stamps each line itself).
        self._timestamp = UtcTimestamp() if timestamps else None

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        if "exc_info" in event:
            structlog.processors.format_exc_info(logger, method, event)
        exception = event.pop("exception", None)
        name = event.pop("event", "")
        # Set by this renderer, as structlog's add_log_level and UtcTimestamp would.
        event.pop("level", None)
        event.pop("timestamp", None)
        fields = [f"{key}={value}" for key, value in event.items() if value is not None]
        text = " ".join([name, *fields])
        level = f"{_LEVELS.get(method, method):<7}"
        if self._timestamp is not None:
            level = f"{self._timestamp.now()} {level}"
        if exception is None and _shown_as_is(text, len(fields)):
            return f"{level} {text}"
        head = f"{level} {name}"
        pairs = " ".join(
            f"{key}={_console_value(value)}" for key, value in event.items() if value is not None
        )
        line = f"{escape_text(head)} {pairs}" if pairs else escape_text(head)
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


def _processors(log_format: LogFormat, journal: bool) -> list[structlog.typing.Processor]:
    processors: list[structlog.typing.Processor]
    if log_format is LogFormat.JSON:
        processors = [structlog.processors.add_log_level]
        if not journal:
            processors.append(UtcTimestamp())
        processors += [structlog.processors.format_exc_info, escape_values]
        renderer: structlog.typing.Processor = structlog.processors.JSONRenderer()
        processors.append(JournalLines(renderer) if journal else renderer)
    elif journal:
        # The journal stamps each line itself; JournalLines reads the level.
        processors = [
            structlog.processors.add_log_level,
            JournalLines(ConsoleRenderer(timestamps=False)),
        ]
    else:
        processors = [ConsoleRenderer()]
    return processors


def configure_logging(
    log_format: LogFormat, level: LogLevel, journal: bool | None = None
) -> structlog.typing.FilteringBoundLogger:
    """Configure structlog once at start and return the root logger.

    ``journal``: lines for systemd's journal (priorities, no timestamp);
    None decides by whether stderr is the journal.
    """
    if journal is None:
        journal = is_journal(sys.stderr)
    structlog.configure(
        processors=_processors(log_format, journal),
        wrapper_class=structlog.make_filtering_bound_logger(level.number),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger()
    return logger


def logger_writing_to(
    stream: TextIO, log_format: LogFormat, level: LogLevel
) -> structlog.typing.FilteringBoundLogger:
    """A logger of the same lines as :func:`configure_logging`'s, on ``stream``.

    Nothing global is configured: for a caller that writes somewhere else
    than stderr (a test, a benchmark); the journal is detected on ``stream``.
    """
    logger: structlog.typing.FilteringBoundLogger = structlog.wrap_logger(
        structlog.WriteLogger(stream),
        processors=_processors(log_format, is_journal(stream)),
        wrapper_class=structlog.make_filtering_bound_logger(level.number),
    )
    return logger
