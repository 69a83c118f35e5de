"""Small JSON state files, written atomically, and a periodic saver.

Used for the whitelist snapshot, the usage ledger and the block list: the
file is replaced whole (temporary file, fsync, rename, fsync of the
directory) with mode 0600, so a crash leaves the old or the new version,
never half of one; and reading is strict, so a damaged file is reported, not
half-believed.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog


class StateFileError(ValueError):
    """A state file cannot be used; the message says why."""


def write_json_atomically(path: Path, document: dict[str, Any]) -> None:
    data = json.dumps(document, separators=(",", ":")).encode()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
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


def read_json_document(path: Path, kind: str, version: int) -> dict[str, Any]:
    """The document at ``path``, checked to be of ``kind`` and ``version``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StateFileError("no such file") from None
    except OSError as error:
        raise StateFileError(f"cannot read: {error.strerror}") from None
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StateFileError("not JSON: truncated or corrupt") from None
    if not isinstance(document, dict) or document.get("format") != kind:
        raise StateFileError(f"not a {kind} file")
    if document.get("version") != version:
        raise StateFileError(f"unsupported version {document.get('version')!r}")
    return document


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
