"""UNIX socket housekeeping shared by every door that listens on one."""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat
from pathlib import Path


class SocketInUse(RuntimeError):
    """Another process is already serving on the socket path."""


def resolve_gid(group: str) -> int:
    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


def clear_stale_socket(path: Path) -> None:
    """Remove a socket left behind by a process that is gone.

    A live socket is never taken over, and a path that is not a socket is
    never deleted: both are configuration mistakes worth stopping for.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise SocketInUse(f"{path} is served by another process")


def prepare_directory(path: Path) -> None:
    """Create the socket's directory; it must be traversable by MTA users."""
    directory = path.parent
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o755)


def set_permissions(path: Path, mode: int, group: str) -> None:
    if group:
        os.chown(path, -1, resolve_gid(group))
    os.chmod(path, mode)


def remove_socket(path: Path) -> None:
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
