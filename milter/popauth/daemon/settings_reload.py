"""SIGHUP and the settings file: what changed, and that it needs a restart.

A reload re-learns local delivery from the MTA; every setting of the file
itself is read once, at start (the sockets, the store, the ttl are built
from it). So a reload reads the file again only to compare, and logs, as a
warning naming each key, the changes that the running popauth does not
apply: the operator then knows to restart instead of trusting the edit.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from popauth.basics.errors import ConfigError
from popauth.config import KEYS, Settings, load_settings


def changed_keys(running: Settings, edited: Settings) -> list[str]:
    """The settings keys whose values differ, in the order popauth.toml(5) lists them."""
    return [key.name for key in KEYS.values() if key.value_in(running) != key.value_in(edited)]


class SettingsChangeCheck:
    """A reload callable: compare the settings file with the settings in use."""

    def __init__(
        self, path: Path | None, running: Settings, log: structlog.typing.FilteringBoundLogger
    ) -> None:
        self._path = path
        self._running = running
        self._log = log

    def __call__(self) -> None:
        if self._path is None:  # embedded defaults: nothing to read again
            return
        try:
            edited = load_settings(self._path)
        except ConfigError as problem:
            self._log.error(
                "settings_file_invalid",
                path=str(self._path),
                error=str(problem),
                hint="the running settings stay; fix the file before the next restart",
            )
            return
        changed = changed_keys(self._running, edited)
        if changed:
            self._log.warning(
                "restart_needed",
                path=str(self._path),
                changed=changed,
                hint="a reload does not apply these; systemctl restart popauth",
            )
