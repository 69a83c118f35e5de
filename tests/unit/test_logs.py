"""The log formats operators read and parse."""

from __future__ import annotations

import json
import re

import pytest
import structlog

from popauth.logs import configure_logging


@pytest.fixture(autouse=True)
def _reset_structlog() -> None:
    structlog.reset_defaults()


def test_console_lines(capsys: pytest.CaptureFixture[str]) -> None:
    log = configure_logging("console", "info")
    log.info("relay_decision", verdict="reject", client_ip="192.0.2.1", user=None, hint="two words")
    log.debug("hidden")
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z info    relay_decision "
        r'verdict=reject client_ip=192\.0\.2\.1 hint="two words"',
        line,
    ), line


def test_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    log = configure_logging("json", "warning")
    log.info("hidden")
    log.warning("pop_first_deprecated", user="alice")
    event = json.loads(capsys.readouterr().err)
    assert event["event"] == "pop_first_deprecated"
    assert event["user"] == "alice"
    assert event["level"] == "warning"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["timestamp"])


def test_exceptions_are_logged_with_their_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    log = configure_logging("console", "info")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("milter_callback_failed", callback="envrcpt")
    text = capsys.readouterr().err
    assert "milter_callback_failed callback=envrcpt" in text
    assert "ValueError: boom" in text
