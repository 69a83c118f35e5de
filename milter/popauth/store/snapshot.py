"""Snapshots of the embedded whitelist, so that a restart locks nobody out.

The file is JSON (see :mod:`popauth.store.statefile`: atomic, mode 0600, because
it names users and their addresses). Reading is strict: a file that is
missing, truncated, corrupt or not a popauth snapshot raises
:class:`~popauth.store.statefile.StateFileError`; the caller logs it and starts empty, it never
guesses. A single entry that is not a valid address, user name and pair of
finite times is dropped and logged; the others are restored.

Version 2 holds one row ``[address, user, granted, expires]`` per user of
each entry, so an address with several users has several rows. Version 1
(earlier releases) had the same rows, one per address (its last login):
it is still read, each row an entry of one user. An older popauth refuses
a version 2 file (and starts empty) rather than keep one user per address.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from popauth.basics.addresses import AddressError, parse_stored_key
from popauth.basics.clock import Clock
from popauth.basics.errors import InputError, StateFileError, StateFileMissing
from popauth.basics.usernames import is_valid_user_name
from popauth.store.base import Grant
from popauth.store.memory import MemoryStore
from popauth.store.pacing import CHUNK, let_others_run
from popauth.store.statefile import read_json_document, write_atomically

FORMAT = "popauth-whitelist"
VERSION = 2
# Read still: one row per address.
OLDER_VERSIONS = (1,)


def write_snapshot(path: Path, grants: Iterable[Grant], saved_at: float) -> int:
    """Write every membership to ``path`` atomically; returns how many.

    The document is made and written a chunk of entries at a time, letting
    other threads run between chunks: encoding a large whitelist in one go
    would keep every RCPT decision waiting for the interpreter meanwhile.
    """
    written = 0

    def document() -> Iterator[bytes]:
        nonlocal written
        head = json.dumps({"format": FORMAT, "version": VERSION, "saved_at": saved_at})
        yield head[:-1].encode() + b',"entries":['
        remaining = iter(grants)
        while chunk := list(itertools.islice(remaining, CHUNK)):
            rows = [
                [str(grant.address), grant.user, grant.granted_at, grant.expires_at]
                for grant in chunk
            ]
            text = json.dumps(rows, separators=(",", ":"), allow_nan=False)[1:-1]
            yield (b"," if written else b"") + text.encode()
            written += len(rows)
            let_others_run()
        yield b"]}"

    write_atomically(path, document())
    return written


@dataclass(frozen=True, slots=True)
class SnapshotContents:
    grants: list[Grant]
    # (entry number, why it was dropped) for every entry not usable.
    dropped: list[tuple[int, str]]


def read_snapshot_contents(path: Path) -> SnapshotContents:
    """The usable grants at ``path``, and which entries were dropped and why.

    A file that cannot be read as a snapshot at all raises StateFileError
    (StateFileMissing when there is none); a single bad entry is dropped.
    Every grant is returned, expired ones included: the store drops those.
    """
    document = read_json_document(path, FORMAT, VERSION, older_versions=OLDER_VERSIONS)
    entries = document.get("entries")
    if not isinstance(entries, list):
        raise StateFileError("no entry list")
    grants: list[Grant] = []
    dropped: list[tuple[int, str]] = []
    for number, entry in enumerate(entries):
        try:
            grants.append(_grant(entry))
        except _BadEntry as problem:
            dropped.append((number, str(problem)))
    return SnapshotContents(grants, dropped)


class _BadEntry(InputError):
    pass


def _grant(entry: Any) -> Grant:
    if not isinstance(entry, list) or len(entry) != 4:
        raise _BadEntry("not [address, user, granted, expires]")
    address_text, user, granted_at, expires_at = entry
    if not isinstance(address_text, str):
        raise _BadEntry("address is not text")
    try:
        address = parse_stored_key(address_text)
    except AddressError:
        raise _BadEntry("not an IP address") from None
    # "" is a login reported without a user name.
    if user != "" and not is_valid_user_name(user):
        raise _BadEntry("not a valid user name")
    for moment in (granted_at, expires_at):
        if isinstance(moment, bool) or not isinstance(moment, int | float):
            raise _BadEntry("a time is not a number")
        if not math.isfinite(moment) or moment < 0:
            raise _BadEntry("a time is not a finite, non-negative number")
    return Grant(address, user, float(granted_at), float(expires_at))


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
            contents = read_snapshot_contents(self._path)
        except StateFileMissing as problem:
            self._log.info("snapshot_not_restored", path=str(self._path), reason=str(problem))
            return
        except StateFileError as problem:
            self._log.error("snapshot_not_restored", path=str(self._path), reason=str(problem))
            return
        for number, reason in contents.dropped:
            self._log.error(
                "snapshot_entry_dropped", path=str(self._path), entry=number, reason=reason
            )
        grants = contents.grants
        restored = self._store.restore(grants)
        # A warning, so that entries left by an earlier run or install are seen.
        level = self._log.warning if restored else self._log.info
        level(
            "snapshot_restored",
            path=str(self._path),
            restored=restored,
            expired=len(grants) - restored,
        )

    def save(self) -> None:
        began = self._clock.monotonic()
        grants = itertools.chain.from_iterable(self._store.entry_chunks())
        count = write_snapshot(self._path, grants, self._clock.time())
        # Info, once a snapshot interval: how long a save takes is worth seeing.
        self._log.info(
            "snapshot_saved",
            path=str(self._path),
            entries=count,
            seconds=round(self._clock.monotonic() - began, 3),
        )
