"""The log formats operators read and parse."""

from __future__ import annotations

import json
import re

import pytest
import structlog

from popauth.telemetry.levels import LogFormat, LogLevel
from popauth.telemetry.logs import configure_logging


@pytest.fixture(autouse=True)
def _reset_structlog() -> None:
    structlog.reset_defaults()


def test_console_lines(capsys: pytest.CaptureFixture[str]) -> None:
    log = configure_logging(LogFormat.CONSOLE, LogLevel.INFO)
    log.info("relay_decision", verdict="reject", client_ip="192.0.2.1", user=None, hint="two words")
    log.debug("hidden")
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z info    relay_decision "
        r'verdict=reject client_ip=192\.0\.2\.1 hint="two words"',
        line,
    ), line


def test_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    log = configure_logging(LogFormat.JSON, LogLevel.WARNING)
    log.info("hidden")
    log.warning("pop_first_deprecated", user="alice")
    event = json.loads(capsys.readouterr().err)
    assert event["event"] == "pop_first_deprecated"
    assert event["user"] == "alice"
    assert event["level"] == "warning"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["timestamp"])


def test_exceptions_are_logged_with_their_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    log = configure_logging(LogFormat.CONSOLE, LogLevel.INFO)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("milter_callback_failed", callback="envrcpt")
    text = capsys.readouterr().err
    assert "milter_callback_failed callback=envrcpt" in text
    assert "ValueError: boom" in text


# Issue 11, defect 9: values from outside carried raw control characters.
HOSTILE = {
    "recipient": "<x\x1b]0;owned\x07@remote.example>",
    "user": "alice\nfake_event verdict=accept",
    "rcpt_addr": "\x9b31mred\u202eevil",
    "hint": b"j\xf6rg \\x41".decode("utf-8", "surrogateescape"),
}
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\ud800-\udfff]")


def test_console_escapes_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    log = configure_logging(LogFormat.CONSOLE, LogLevel.INFO)
    log.info("relay_decision", **HOSTILE)
    text = capsys.readouterr().err
    assert text.count("\n") == 1, text
    assert RAW_CONTROL.search(text) is None, repr(text)
    assert "recipient=<x\\x1b]0;owned\\x07@remote.example>" in text
    assert 'user="alice\\nfake_event verdict=accept"' in text
    assert "rcpt_addr=\\x9b31mred\\u202eevil" in text
    assert 'hint="j\\xf6rg \\\\x41"' in text


def test_json_escapes_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    log = configure_logging(LogFormat.JSON, LogLevel.INFO)
    log.info("relay_decision", **HOSTILE)
    text = capsys.readouterr().err
    assert text.count("\n") == 1
    assert RAW_CONTROL.search(text) is None, repr(text)
    event = json.loads(text)
    for key in HOSTILE:
        assert RAW_CONTROL.search(event[key]) is None, event[key]
    assert event["recipient"] == "<x\\x1b]0;owned\\x07@remote.example>"
    assert event["user"] == "alice\\nfake_event verdict=accept"
    assert event["hint"] == "j\\xf6rg \\\\x41"


def test_printable_unicode_stays_readable(capsys: pytest.CaptureFixture[str]) -> None:
    log = configure_logging(LogFormat.CONSOLE, LogLevel.INFO)
    log.info("relay_decision", user="jörg", recipient="<用户@例子.测试>")
    text = capsys.readouterr().err
    assert "user=jörg recipient=<用户@例子.测试>" in text


@pytest.mark.parametrize("log_format", list(LogFormat))
def test_tracebacks_keep_their_lines_but_escape_the_rest(
    log_format: LogFormat, capsys: pytest.CaptureFixture[str]
) -> None:
    log = configure_logging(log_format, LogLevel.INFO)
    try:
        raise ValueError("bad user \x1b[2J")
    except ValueError:
        log.exception("ingest_request_failed")
    text = capsys.readouterr().err
    assert "\x1b" not in text
    assert "ValueError: bad user \\x1b[2J" in (
        text if log_format is LogFormat.CONSOLE else json.loads(text)["exception"]
    )
