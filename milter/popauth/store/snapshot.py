"""Snapshots of the embedded whitelist, so that a restart locks nobody out.

The file is JSON (see :mod:`popauth.persistence`: atomic, mode 0600, because
it names users and their addresses). Reading is strict: a file that is
missing, truncated, corrupt or not a popauth snapshot raises
:class:`SnapshotError`; the caller logs it and starts empty, it never
guesses.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog

from popauth.addresses import AddressError, parse_client_address
from popauth.clock import Clock
from popauth.persistence import StateFileError, read_json_document, write_json_atomically
from popauth.store.base import Grant
from popauth.store.memory import MemoryStore

FORMAT = "popauth-whitelist"
VERSION = 1


class SnapshotError(ValueError):
    """The snapshot file cannot be used; the message says why."""


def write_snapshot(path: Path, grants: Iterable[Grant], saved_at: float) -> int:
    """Write every grant to ``path`` atomically; returns how many."""
    entries = [
        [str(grant.address), grant.user, grant.granted_at, grant.expires_at] for grant in grants
    ]
    document = {"format": FORMAT, "version": VERSION, "saved_at": saved_at, "entries": entries}
    write_json_atomically(path, document)
    return len(entries)


def read_snapshot(path: Path) -> list[Grant]:
    """Every grant in the snapshot at ``path``, expired ones included."""
    try:
        document = read_json_document(path, FORMAT, VERSION)
    except StateFileError as problem:
        raise SnapshotError(str(problem)) from None
    entries = document.get("entries")
    if not isinstance(entries, list):
        raise SnapshotError("no entry list")
    return [_grant(entry, number) for number, entry in enumerate(entries)]


def _grant(entry: Any, number: int) -> Grant:
    try:
        address_text, user, granted_at, expires_at = entry
        if not isinstance(user, str) or isinstance(granted_at, bool):
            raise TypeError
        return Grant(parse_client_address(address_text), user, float(granted_at), float(expires_at))
    except (TypeError, ValueError, AddressError):
        raise SnapshotError(f"entry {number} is malformed") from None


class Snapshotter:
    """Restores the embedded store at start and saves it (periodically, at stop)."""

    def __init__(
        self,
        *,
        store: MemoryStore,
        path: Path,
        clock: Clock,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._store = store
        self._path = path
        self._clock = clock
        self._log = log.bind(component="snapshot")

    def restore(self) -> None:
        """Load the snapshot into the (empty) store; a bad file means starting empty."""
        try:
            grants = read_snapshot(self._path)
        except SnapshotError as problem:
            level = self._log.info if str(problem) == "no such file" else self._log.error
            level("snapshot_not_restored", path=str(self._path), reason=str(problem))
            return
        restored = self._store.restore(grants)
        self._log.info(
            "snapshot_restored",
            path=str(self._path),
            restored=restored,
            expired=len(grants) - restored,
        )

    def save(self) -> None:
        count = write_snapshot(self._path, self._store.entries(), self._clock.time())
        self._log.debug("snapshot_saved", path=str(self._path), entries=count)
