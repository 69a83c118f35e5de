"""Small JSON state files: written atomically, their numbers checked; a periodic saver.

Used for the whitelist snapshot, the usage ledger and the block list: the
file is replaced whole (temporary file, fsync, rename, fsync of the
directory) with mode 0600, so a crash leaves the old or the new version,
never half of one; and reading is strict, so a damaged file is reported, not
half-believed.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import structlog

from popauth.basics.errors import (
    StateDirectoryUnsafe,
    StateFileError,
    StateFileMissing,
    StateWriteError,
)


def check_state_directory(directory: Path) -> None:
    """Refuse a directory that others can write, or that belongs to someone else.

    Whoever can write the directory holding a state file can replace that
    file (a forged whitelist, an emptied block list) or plant links in it,
    so it must belong to root or to us and be writable by its owner only.
    """
    try:
        status = os.stat(directory)
    except OSError as error:
        raise StateDirectoryUnsafe(f"{directory}: cannot inspect: {error.strerror}") from None
    if not stat.S_ISDIR(status.st_mode):
        raise StateDirectoryUnsafe(f"{directory}: not a directory")
    if status.st_uid not in (0, os.geteuid()):
        raise StateDirectoryUnsafe(
            f"{directory}: owned by uid {status.st_uid}, not by root or by popauth's user"
        )
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateDirectoryUnsafe(
            f"{directory}: writable by group or others (mode {stat.S_IMODE(status.st_mode):04o})"
        )


def prepare_state_directory(path: Path) -> None:
    """Create the directory of state file ``path`` (mode 0700) if needed, then check it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as error:
        raise StateDirectoryUnsafe(f"{path.parent}: cannot create: {error.strerror}") from None
    check_state_directory(path.parent)


def write_json_atomically(path: Path, document: dict[str, Any]) -> None:
    """Replace ``path`` with ``document``; StateWriteError (nothing changed) if it fails."""
    write_atomically(path, [json.dumps(document, separators=(",", ":"), allow_nan=False).encode()])


def write_atomically(path: Path, chunks: Iterable[bytes]) -> None:
    """Replace ``path`` with the concatenated ``chunks``, written as they come.

    StateWriteError (nothing changed) if it fails; an exception raised while
    the chunks are made leaves nothing behind either.
    """
    try:
        prepare_state_directory(path)
    except StateDirectoryUnsafe as problem:
        raise StateWriteError(errno.EPERM, str(problem)) from None
    try:
        # An unpredictable name, created O_EXCL (and mkstemp never follows a
        # planted link): nobody can aim our write at another file.
        descriptor, temporary_name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
    except OSError as error:
        raise StateWriteError(error.errno, f"cannot write {path}: {error.strerror}") from None
    temporary = Path(temporary_name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise StateWriteError(error.errno, f"cannot write {path}: {error.strerror}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_json_document(
    path: Path, kind: str, version: int, *, older_versions: Collection[int] = ()
) -> dict[str, Any]:
    """The document at ``path``, checked to be of ``kind`` and ``version``
    (or one of ``older_versions``, which the caller still reads)."""
    try:
        # A state file is never a link: one there was planted.
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise StateFileMissing("no such file") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise StateFileError("is a symbolic link") from None
        raise StateFileError(f"cannot read: {error.strerror}") from None
    try:
        with os.fdopen(descriptor, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise StateFileError(f"cannot read: {error.strerror}") from None
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StateFileError("not JSON: truncated or corrupt") from None
    if not isinstance(document, dict) or document.get("format") != kind:
        raise StateFileError(f"not a {kind} file")
    found = document.get("version")
    if isinstance(found, bool) or (found != version and found not in older_versions):
        raise StateFileError(f"unsupported version {document.get('version')!r}")
    return document


def saved_number(value: object) -> float | None:
    """A saved finite number, as a float; None for anything else (a boolean too)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def saved_time(value: object) -> float | None:
    """A saved moment or span: a finite number, not negative; None for anything else."""
    number = saved_number(value)
    return None if number is None or number < 0 else number


def saved_count(value: object, least: int = 0) -> int | None:
    """A saved whole number of at least ``least``; None for anything else (a boolean too)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        return None
    return value


class PeriodicSaver:
    """Calls each save function every ``interval`` seconds and once more at stop."""

    def __init__(
        self,
        *,
        interval: float,
        saves: Sequence[Callable[[], None]],
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._interval = interval
        self._saves = saves
        self._log = log
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="popauth-saver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            self._save_all()

    def _save_all(self) -> None:
        for save in self._saves:
            try:
                save()
            except OSError as error:
                self._log.error("state_save_failed", error=str(error))

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._save_all()
