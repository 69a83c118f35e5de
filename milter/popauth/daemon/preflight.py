"""Before serving: is another popauth already here, and on whose paths?

``popauth serve`` refuses a socket that a live process serves and a state
directory that belongs to someone else; those refusals stay where they are
(:mod:`popauth.doors.sockets`, :mod:`popauth.store.statefile`). This check runs first
and says the same in one line an operator can act on: which process holds
the socket (pid and user, read from ``SO_PEERCRED``), whether it is a
popauth (it answers ``PING``), whose directory it is, and what to do. It
refuses nothing that the later checks would let through.
"""

from __future__ import annotations

import enum
import os
import pwd
import socket
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from popauth.config import Settings
from popauth.doors.ingest.client import IngestClient, IngestUnreachable
from popauth.doors.ingest.wire import OK

_PROBE_TIMEOUT = 1.0


class Occupancy(enum.Enum):
    # A live process serves one of the sockets.
    RUNNING = "running"
    # A directory of the sockets or the state belongs to another user.
    FOREIGN_DIRECTORY = "foreign_directory"


@dataclass(frozen=True, slots=True)
class Occupant:
    kind: Occupancy
    # One line: who holds what.
    text: str


@dataclass(frozen=True, slots=True)
class Holder:
    """The process that serves a socket."""

    pid: int
    uid: int


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def socket_holder(path: Path) -> Holder | None:
    """Who serves the UNIX socket at ``path``; None when nothing does."""
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            return None
    except OSError:
        return None
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(_PROBE_TIMEOUT)
        probe.connect(str(path))
        credentials = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    finally:
        probe.close()
    pid, uid, _ = struct.unpack("3i", credentials)
    return Holder(pid, uid)


def answers_as_popauth(path: Path) -> bool:
    try:
        reply = IngestClient(str(path), _PROBE_TIMEOUT).request("PING")
    except (IngestUnreachable, OSError):
        return False
    return reply[0].split(" ", 1)[0] == OK


def socket_paths(settings: Settings) -> list[Path]:
    """The UNIX sockets these settings serve on, the ingest socket first."""
    paths = [settings.ingest.socket]
    spec = settings.milter.socket
    for prefix in ("unix:", "local:"):
        if spec.startswith(prefix):
            paths.append(Path(spec.removeprefix(prefix)))
    if settings.socketmap.socket is not None:
        paths.append(settings.socketmap.socket)
    if settings.policy.socket is not None:
        paths.append(settings.policy.socket)
    return paths


def occupant(settings: Settings, state_files: Iterable[Path]) -> Occupant | None:
    """Who is in the way of serving these settings here, or None."""
    for path in socket_paths(settings):
        holder = socket_holder(path)
        if holder is not None:
            who = f"pid {holder.pid}, user {user_name(holder.uid)}"
            if path == settings.ingest.socket and answers_as_popauth(path):
                text = f"popauth already runs here ({who}) and serves {path}"
            else:
                text = f"{path} is already served by another process ({who})"
            return Occupant(Occupancy.RUNNING, text)
    me = user_name(os.geteuid())
    for directory in dict.fromkeys(path.parent for path in socket_paths(settings)):
        if directory.is_dir() and not os.access(directory, os.W_OK | os.X_OK):
            owner = user_name(directory.stat().st_uid)
            text = (
                f"{directory} belongs to user {owner}, and this popauth ({me})"
                " cannot put its sockets there"
            )
            return Occupant(Occupancy.FOREIGN_DIRECTORY, text)
    for directory in dict.fromkeys(path.parent for path in state_files):
        try:
            owner_uid = directory.stat().st_uid
        except OSError:
            continue
        if owner_uid not in (0, os.geteuid()):
            text = (
                f"{directory} belongs to user {user_name(owner_uid)}: another popauth keeps its"
                f" state there, and this one runs as {me}"
            )
            return Occupant(Occupancy.FOREIGN_DIRECTORY, text)
    return None
