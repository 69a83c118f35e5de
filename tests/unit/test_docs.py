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
