"""Log lines for the journal: a <N> priority per line, no timestamp of popauth's own."""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path

import pytest
import structlog

from popauth.config import settings_from_mapping
from popauth.daemon.settings_reload import SettingsChangeCheck, changed_keys
from popauth.telemetry.journal import is_journal, with_priority
from popauth.telemetry.levels import LogFormat, LogLevel
from popauth.telemetry.logs import configure_logging, logger_writing_to


@pytest.fixture(autouse=True)
def _reset_structlog() -> None:
    structlog.reset_defaults()


def test_the_journal_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "stream").open("w") as stream, (tmp_path / "other").open("w") as other:
        status = os.fstat(stream.fileno())
        named = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
        assert is_journal(stream, named)
        assert not is_journal(other, named)  # stderr redirected away from the journal
        assert not is_journal(stream, {})
        assert not is_journal(stream, {"JOURNAL_STREAM": "garbage"})
    assert not is_journal(io.StringIO(), named)


def test_every_line_gets_its_priority() -> None:
    assert with_priority("warning", "restart_needed changed=ttl") == "<4>restart_needed changed=ttl"
    assert with_priority("error", "boom\nTraceback\n  line") == "<3>boom\n<3>Traceback\n<3>  line"
    assert with_priority("info", "x") == "<6>x"
    assert with_priority("debug", "x") == "<7>x"


def test_structlog_lines_for_the_journal(capsys: pytest.CaptureFixture[str]) -> None:
    log = configure_logging(LogFormat.CONSOLE, LogLevel.INFO, journal=True)
    log.warning("restart_needed", changed=["ttl"])
    log.info("starting", ttl=900)
    warning, info = capsys.readouterr().err.splitlines()
    assert warning.startswith("<4>warning restart_needed ")
    assert info == "<6>info    starting ttl=900"
    # No timestamp of its own: the journal stamps each line.
    assert not re.search(r"\d{4}-\d\d-\d\dT", warning + info)


def test_json_lines_for_the_journal(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogFormat.JSON, LogLevel.INFO, journal=True).error("oops", key="v")
    line = capsys.readouterr().err.strip()
    assert line.startswith("<3>{")
    assert "timestamp" not in line


def test_sessions_lines_for_the_journal() -> None:
    with tempfile.TemporaryFile("w+") as stream:
        status = os.fstat(stream.fileno())
        os.environ["JOURNAL_STREAM"] = f"{status.st_dev}:{status.st_ino}"
        try:
            log = logger_writing_to(stream, LogFormat.CONSOLE, LogLevel.INFO)
            log.warning("sessions_unlisted", error="x")
        finally:
            del os.environ["JOURNAL_STREAM"]
        stream.seek(0)
        # The same line as popauth serve's (no quotes around a plain value).
        assert stream.read() == "<4>warning sessions_unlisted error=x\n"


def test_a_reload_names_the_changed_keys_that_need_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running = settings_from_mapping({"ttl": 900, "log_level": "info"})
    assert changed_keys(running, settings_from_mapping({"ttl": 900})) == []
    edited = settings_from_mapping({"ttl": 60, "max_entries": 5})
    assert sorted(changed_keys(running, edited)) == ["max_entries", "ttl"]
    path = tmp_path / "popauth.toml"
    path.write_text("ttl = 60\n")
    log = configure_logging(LogFormat.JSON, LogLevel.INFO, journal=False)
    SettingsChangeCheck(path, running, log)()
    assert '"changed": ["ttl"]' in capsys.readouterr().err
    path.write_text("ttl = 900\n")
    SettingsChangeCheck(path, running, log)()
    assert capsys.readouterr().err == ""
    path.write_text("ttl = -1\n")
    SettingsChangeCheck(path, running, log)()
    assert "settings_file_invalid" in capsys.readouterr().err
