"""``popauth check-config --show``: the effective settings, those changed marked.

Like ``postconf`` with ``-n`` and ``-d`` in one listing: every key in the
file's own syntax, each changed from its default followed by the default.
The output is TOML again, so a line can be copied into the settings file.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from popauth.basics.addresses import NetworkSet
from popauth.basics.posixids import SystemGroup, SystemUser
from popauth.config.converters import ListenAddress
from popauth.config.groups import LEARNED_UNLESS_SET, Settings
from popauth.config.loader import KEYS, Key

CHANGED = "# changed; default: "
# Secrets are not printed: the output goes into bug reports and tickets.
_SECRET_KEYS = frozenset({"redis_sentinel_password"})
_HIDDEN = "(hidden)"


def as_toml(value: Any) -> Any:
    """A typed setting as the raw TOML value that converts back to it."""
    if value is None:
        return ""  # the file's one way to say "off"
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path | ListenAddress | SystemUser | SystemGroup):
        return str(value)
    if isinstance(value, NetworkSet):
        return [str(network) for network in value]
    if isinstance(value, tuple):
        return [as_toml(item) for item in value]
    return value


def toml_of(key: Key, value: Any) -> Any:
    return key.shown(value) if key.shown is not None and value is not None else as_toml(value)


def _literal(value: Any) -> str:
    """A TOML literal: strings and lists of them as JSON writes them, which TOML reads."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _hide_password(key: Key, literal: str) -> str:
    if key.name in _SECRET_KEYS and literal != '""':
        return f'"{_HIDDEN}"'
    if key.name == "redis_url":
        # redis://user:secret@host: the password between ':' and '@'.
        scheme, separator, rest = literal.partition("://")
        credentials, at, host = rest.rpartition("@")
        if separator and at and ":" in credentials:
            user = credentials.split(":", 1)[0]
            return f"{scheme}://{user}:{_HIDDEN}@{host}"
    return literal


def effective_lines(settings: Settings) -> Iterator[str]:
    """One line per key, in the order of the groups; changed ones say their default."""
    for key in KEYS.values():
        value = key.value_in(settings)
        if key.name in LEARNED_UNLESS_SET and value is None:
            yield f"# {key.name}: not set, learned from the MTA"
            continue
        line = f"{key.name} = " + _hide_password(key, _literal(toml_of(key, value)))
        if value != key.default:
            if key.name in LEARNED_UNLESS_SET:
                default = "not set, learned from the MTA"
            else:
                default = _hide_password(key, _literal(toml_of(key, key.default)))
            line += f"  {CHANGED}{default}"
        yield line
