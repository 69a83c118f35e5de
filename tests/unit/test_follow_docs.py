"""docs/follow.rst renders, and documents every follow_* setting."""

from __future__ import annotations

import io
from pathlib import Path

import docutils.core

from popauth.config import KEYS

DOC = Path(__file__).parents[2] / "docs" / "follow.rst"


def test_follow_doc_renders_without_warnings() -> None:
    warnings = io.StringIO()
    docutils.core.publish_string(
        DOC.read_text(),
        writer="null",
        settings_overrides={"warning_stream": warnings, "report_level": 2, "halt_level": 5},
    )
    assert warnings.getvalue() == ""


def test_follow_doc_lists_every_follow_setting() -> None:
    text = DOC.read_text()
    keys = [key for key in KEYS if key.startswith("follow_")]
    assert len(keys) == 13
    for key in keys:
        assert f"``{key}``" in text, key
