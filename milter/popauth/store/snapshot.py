"""Snapshots of the embedded whitelist, so that a restart locks nobody out.

The file is JSON, written atomically (temporary file, fsync, rename, fsync of
the directory) with mode 0600 because it names users and their addresses.
Reading is strict: a file that is missing, truncated, corrupt or not a
popauth snapshot raises :class:`SnapshotError`; the caller logs it and
starts empty, it never guesses.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog

from popauth.addresses import AddressError, parse_client_address
from popauth.clock import Clock
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
    data = json.dumps(document, separators=(",", ":")).encode()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return len(entries)


def read_snapshot(path: Path) -> list[Grant]:
    """Every grant in the snapshot at ``path``, expired ones included."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SnapshotError("no snapshot file") from None
    except OSError as error:
        raise SnapshotError(f"cannot read: {error.strerror}") from None
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SnapshotError("not JSON: truncated or corrupt") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SnapshotError("not a popauth whitelist snapshot")
    if document.get("version") != VERSION:
        raise SnapshotError(f"unsupported snapshot version {document.get('version')!r}")
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
    """Saves the embedded store every ``interval`` seconds and at stop."""

    def __init__(
        self,
        *,
        store: MemoryStore,
        path: Path,
        interval: float,
        clock: Clock,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._store = store
        self._path = path
        self._interval = interval
        self._clock = clock
        self._log = log.bind(component="snapshot")
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def restore(self) -> None:
        """Load the snapshot into the (empty) store; a bad file means starting empty."""
        try:
            grants = read_snapshot(self._path)
        except SnapshotError as problem:
            level = self._log.info if str(problem) == "no snapshot file" else self._log.error
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
        try:
            count = write_snapshot(self._path, self._store.entries(), self._clock.time())
        except OSError as error:
            self._log.error("snapshot_failed", path=str(self._path), error=str(error))
            return
        self._log.debug("snapshot_saved", path=str(self._path), entries=count)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="popauth-snapshot", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            self.save()

    def stop(self) -> None:
        """Stop the periodic saves and write a last snapshot."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.save()
        self._log.info("snapshot_saved_at_stop", path=str(self._path))
