"""The README is the operator's manual: it must render, and its commands must exist."""

from __future__ import annotations

import io
from pathlib import Path

import docutils.core

README = Path(__file__).parents[2] / "README.rst"


def test_readme_renders_without_warnings() -> None:
    warnings = io.StringIO()
    docutils.core.publish_string(
        README.read_text(),
        writer="null",
        settings_overrides={"warning_stream": warnings, "report_level": 2, "halt_level": 5},
    )
    assert warnings.getvalue() == ""


def test_readme_states_the_two_setup_commands() -> None:
    text = README.read_text()
    assert "``make run``" in text
    assert "``make test``" in text
