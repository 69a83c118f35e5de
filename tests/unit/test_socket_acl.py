"""More groups on a socket by a POSIX ACL (``ingest_socket_acl_groups``)."""

from __future__ import annotations

import errno
import grp
import os
import pwd
import shutil
import socket
import stat
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from popauth.basics.posixids import system_group
from popauth.doors.sockets import SocketSetupError, access_acl, set_permissions
from tests.support.peers import needs_root


def test_the_acl_is_the_mode_plus_each_group_in_the_kernel_order() -> None:
    acl = access_acl(0o660, [2000, 1000, 2000])
    version, *rest = struct.unpack("<I" + "HHI" * 6, acl)
    entries = [tuple(rest[i : i + 3]) for i in range(0, len(rest), 3)]
    none = 0xFFFFFFFF
    assert version == 2
    assert entries == [
        (0x01, 0o6, none),  # owner
        (0x04, 0o6, none),  # owning group
        (0x08, 0o6, 1000),  # named groups, by id, once each
        (0x08, 0o6, 2000),
        (0x10, 0o6, none),  # mask
        (0x20, 0o0, none),  # others
    ]


@pytest.fixture
def open_directory() -> Iterator[Path]:
    """A directory others can enter (pytest's tmp_path is root's own)."""
    directory = Path(tempfile.mkdtemp(prefix="popauth-acl-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


@needs_root
def test_a_socket_admits_its_acl_groups_and_no_one_else(open_directory: Path) -> None:
    path = open_directory / "ingest.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(8)
        set_permissions(path, 0o660, system_group("root"), (system_group("nogroup"),))
        status = path.stat()
        # The mode still reads 0660, with the owning group unchanged.
        assert (stat.S_IMODE(status.st_mode), status.st_gid) == (0o660, 0)
        assert os.getxattr(path, "system.posix_acl_access") == access_acl(
            0o660, [grp.getgrnam("nogroup").gr_gid]
        )
        nogroup, daemon = grp.getgrnam("nogroup").gr_gid, grp.getgrnam("daemon").gr_gid
        listener.settimeout(5)
        admitted = connects("nobody", nogroup, path, listener)
        refused = connects("nobody", daemon, path, listener)
    assert admitted
    assert not refused


def connects(user: str, group: int, path: Path, listener: socket.socket) -> bool:
    """Whether ``user`` with primary group ``group`` (and no other) can connect."""
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(group)
            os.setuid(pwd.getpwnam(user).pw_uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(str(path))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    connected = os.waitstatus_to_exitcode(status) == 0
    if connected:
        listener.accept()[0].close()
    return connected


def test_a_file_system_without_acls_is_an_error_naming_the_socket(
    open_directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = open_directory / "ingest.sock"
    path.write_text("")

    def unsupported(*arguments: object) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "setxattr", unsupported)
    with pytest.raises(SocketSetupError, match=f"{path}: cannot give the groups nogroup"):
        set_permissions(path, 0o660, None, (system_group("nogroup"),))
