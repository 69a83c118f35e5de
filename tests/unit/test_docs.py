"""The reference documentation cannot drift from the code."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import popauth
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


_LOG_METHODS = {"debug": "debug", "info": "info", "warning": "warning", "error": "error"}
# exception() is an error with its traceback.
_LOG_METHODS["exception"] = "error"
# Events whose name is made at run time, and their level.
_NAMED_AT_RUN_TIME = {
    ("block", "info"),  # the BLOCK verb's name, lower case (doors/ingest/server.py)
    ("revokeuser", "info"),  # likewise REVOKEUSER
    ("local_delivery", "info"),  # log_local_delivery(), at start
    ("local_delivery_reloaded", "info"),  # likewise, after a SIGHUP
}


def _log_level(call: ast.expr) -> str | None:
    """The level of ``log.info`` (any receiver named like a logger), else None."""
    if not isinstance(call, ast.Attribute) or call.attr not in _LOG_METHODS:
        return None
    return _LOG_METHODS[call.attr] if "log" in ast.unparse(call.value) else None


def logged_events() -> set[tuple[str, str]]:
    """(event, level) of every logger call with a literal event name in the source.

    ``level = log.warning if ... else log.info`` then ``level("event")``
    counts under both levels.
    """
    found: set[tuple[str, str]] = set()
    for path in Path(popauth.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        chosen: dict[str, list[str]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.IfExp):
                levels = [_log_level(node.value.body), _log_level(node.value.orelse)]
                for target in node.targets:
                    if isinstance(target, ast.Name) and None not in levels:
                        chosen[target.id] = [level for level in levels if level]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = node.args[0]
            if not isinstance(name, ast.Constant) or not isinstance(name.value, str):
                continue
            if isinstance(node.func, ast.Name) and node.func.id in chosen:
                found.update((name.value, level) for level in chosen[node.func.id])
            elif (level := _log_level(node.func)) is not None:
                found.add((name.value, level))
    return found | _NAMED_AT_RUN_TIME


# An event in docs/logs.rst: ``name`` (level[, level])
_EVENT_TERM = re.compile(r"^``([a-z_]+)`` \(([a-z, ]+)\)$", re.MULTILINE)


def test_log_reference_lists_every_event_with_its_levels() -> None:
    documented = {
        (name, level.strip())
        for name, levels in _EVENT_TERM.findall((DOCS / "logs.rst").read_text())
        for level in levels.split(",")
    }
    assert sorted(documented) == sorted(logged_events())
