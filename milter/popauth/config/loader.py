"""The loader: the one place where flat TOML keys become typed groups.

An unknown key or a bad value stops ``popauth serve`` with a message naming
the key, because a typo in a relay-control config must not silently fall
back to something else.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popauth.basics.errors import ConfigError
from popauth.config.converters import Converter
from popauth.config.groups import CONVERT, KEY, SHOWN, Settings


@dataclass(frozen=True, slots=True)
class Key:
    """Where a flat TOML key lives: its group, its field, its converter."""

    name: str
    group: str
    field: str
    convert: Converter[Any]
    default: Any
    # How a value of this key is written in TOML, when not by its type alone.
    shown: Callable[[Any], Any] | None = None

    def value_in(self, settings: Settings) -> Any:
        return getattr(getattr(settings, self.group), self.field)


def _keys() -> Iterator[Key]:
    for group in dataclasses.fields(Settings):
        group_class = group.default_factory
        assert isinstance(group_class, type)
        for item in dataclasses.fields(group_class):
            yield Key(
                item.metadata[KEY],
                group.name,
                item.name,
                item.metadata[CONVERT],
                item.default,
                item.metadata[SHOWN],
            )


KEYS: Mapping[str, Key] = {key.name: key for key in _keys()}


def settings_from_mapping(raw: Mapping[str, Any]) -> Settings:
    """Typed settings from flat ``key = value`` pairs; unset keys keep their default."""
    groups: dict[str, dict[str, Any]] = {}
    for name, value in raw.items():
        key = KEYS.get(name)
        if key is None:
            close = difflib.get_close_matches(name, KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown setting {name!r}{hint}")
        try:
            converted = key.convert(value)
        except ValueError as error:
            raise ConfigError(f"bad value for {name!r}: {error}") from None
        groups.setdefault(key.group, {})[key.field] = converted
    made: dict[str, Any] = {}
    for group in dataclasses.fields(Settings):
        assert isinstance(group.default_factory, type)
        made[group.name] = group.default_factory(**groups.get(group.name, {}))
    return Settings(**made)


_POSITION = re.compile(r"\(at line (\d+), column \d+\)")
_ASSIGNMENT = re.compile(r"\s*([A-Za-z0-9_-]+)\s*=")


def _duplicate_key(text: str, error: tomllib.TOMLDecodeError) -> str | None:
    """The key a "Cannot overwrite a value" error is about, which tomllib does not say."""
    position = _POSITION.search(str(error))
    if not str(error).startswith("Cannot overwrite") or position is None:
        return None
    lines = text.splitlines()[: int(position.group(1))]
    # The value may span lines (an array): its key is the last one assigned.
    for line_number in range(len(lines), 0, -1):
        assigned = _ASSIGNMENT.match(lines[line_number - 1])
        if assigned is not None:
            first = next(
                number
                for number, line in enumerate(lines, 1)
                if (earlier := _ASSIGNMENT.match(line)) and earlier.group(1) == assigned.group(1)
            )
            return f"{assigned.group(1)!r} is set twice, on lines {first} and {line_number}"
    return None


def read_settings_file(path: Path) -> dict[str, Any]:
    """The raw ``key = value`` pairs of a TOML file, not yet checked."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not valid TOML: not UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        duplicate = _duplicate_key(text, error)
        if duplicate is not None:
            raise ConfigError(
                f"{path}: setting {duplicate}; edit the first one instead of adding another"
            ) from None
        raise ConfigError(f"{path} is not valid TOML: {error}") from None


def load_settings(path: Path | None) -> Settings:
    """Settings from a TOML file, or the embedded defaults when path is None."""
    if path is None:
        return Settings()
    return settings_from_mapping(read_settings_file(path))
