"""The reference documentation cannot drift from the code."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from popauth.config import KEYS, LEARNED_UNLESS_SET

DOCS = Path(__file__).parents[2] / "docs"
# A setting is documented as a definition-list term: ``key = default``.
_SETTING_TERM = re.compile(r"^``([a-z0-9_]+ = .*)``$", re.MULTILINE)


def test_configuration_reference_lists_every_setting_with_its_default() -> None:
    documented = tomllib.loads(
        "\n".join(_SETTING_TERM.findall((DOCS / "configuration.rst").read_text()))
    )
    assert sorted(documented) == sorted(KEYS)
    for name, value in documented.items():
        converted = KEYS[name].convert(value)
        # A key learned unless set shows an example; the others their default.
        assert name in LEARNED_UNLESS_SET or converted == KEYS[name].default, name


def test_reasons_table_lists_exactly_the_reasons() -> None:
    from popauth.relay.decision import Reason

    text = (DOCS / "decisions.rst").read_text()
    table = text[text.index("\nReasons\n=======") :]
    listed = re.findall(r"^``([a-z_]+)``\s+(?:accept|reject|tempfail)\b", table, re.MULTILINE)
    assert sorted(listed) == sorted(reason.value for reason in Reason)


def test_man_pages_build_without_warnings_and_match_their_sources() -> None:
    import subprocess
    import sys

    script = DOCS.parent / "scripts" / "build-man"
    checked = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr == ""
    page = (DOCS.parent / "man" / "popauth.toml.5").read_text()
    assert '.TH "popauth.toml" "5"' in page
    for key in KEYS:
        assert key.replace("_", "\\_") in page or key in page, key
