"""UNIX socket housekeeping shared by every door that listens on one."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
from collections.abc import Iterable
from pathlib import Path

from popauth.basics.errors import StartupError
from popauth.basics.posixids import SystemGroup


class SocketInUse(StartupError, RuntimeError):
    """Another process is already serving on the socket path."""


class SocketSetupError(StartupError, RuntimeError):
    """A socket's permissions cannot be set as configured; the message says why."""


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


def set_permissions(
    path: Path, mode: int, group: SystemGroup | None, acl_groups: Iterable[SystemGroup] = ()
) -> None:
    """``group`` None: the socket keeps the group the process gave it."""
    if group is not None:
        os.chown(path, -1, group.gid)
    os.chmod(path, mode)
    gids = sorted({acl_group.gid for acl_group in acl_groups})
    if gids:
        try:
            os.setxattr(path, _ACCESS_ACL, access_acl(mode, gids))
        except OSError as error:
            names = ", ".join(map(str, acl_groups))
            raise SocketSetupError(
                f"{path}: cannot give the groups {names} access by a POSIX ACL: {error.strerror}"
            ) from None


# The kernel's binary form of a POSIX access ACL (linux/posix_acl_xattr.h),
# set directly: the standard library has no ACL calls, and the setfacl
# program may be missing.
_ACCESS_ACL = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _GROUP_OBJ, _NAMED_GROUP, _MASK, _OTHER = 0x01, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF
# Connecting to a UNIX socket needs write permission; read and write, as
# ingest_socket_mode = "0660" gives its group.
_READ_WRITE = 0o6


def access_acl(mode: int, gids: Iterable[int]) -> bytes:
    """The ACL of ``mode`` plus read and write for each group in ``gids``."""

    def entry(tag: int, permissions: int, ident: int = _NO_ID) -> bytes:
        return struct.pack("<HHI", tag, permissions, ident)

    owner, group, other = (mode >> 6) & 0o7, (mode >> 3) & 0o7, mode & 0o7
    # Entries in the kernel's order: by tag, named groups by id; the mask
    # is the union of the group class, as setfacl computes it.
    entries = [entry(_USER_OBJ, owner), entry(_GROUP_OBJ, group)]
    entries += [entry(_NAMED_GROUP, _READ_WRITE, gid) for gid in sorted(set(gids))]
    entries += [entry(_MASK, group | _READ_WRITE), entry(_OTHER, other)]
    return struct.pack("<I", _ACL_VERSION) + b"".join(entries)


def remove_socket(path: Path) -> None:
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
