"""Before serving: who already holds popauth's sockets or state, in one line."""

from __future__ import annotations

import os
import pwd
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from popauth.config import Settings, settings_from_mapping
from popauth.daemon.preflight import Occupancy, Occupant, occupant, socket_holder
from tests.support.ingest_endpoint import Endpoint
from tests.support.peers import needs_root


def settings_in(directory: Path) -> Settings:
    return settings_from_mapping(
        {
            "ingest_socket": str(directory / "ingest.sock"),
            "milter_socket": f"unix:{directory / 'milter.sock'}",
            "socketmap_socket": str(directory / "socketmap.sock"),
        }
    )


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    served = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    served.bind(str(tmp_path / "milter.sock"))
    served.listen()
    yield served
    served.close()


def test_nothing_in_the_way(tmp_path: Path) -> None:
    assert occupant(settings_in(tmp_path), [tmp_path / "state" / "whitelist.json"]) is None


def test_a_live_socket_names_its_process(tmp_path: Path, listener: socket.socket) -> None:
    holder = socket_holder(tmp_path / "milter.sock")
    assert holder is not None and (holder.pid, holder.uid) == (os.getpid(), os.getuid())
    me = pwd.getpwuid(os.getuid()).pw_name
    assert occupant(settings_in(tmp_path), []) == Occupant(
        Occupancy.RUNNING,
        f"{tmp_path / 'milter.sock'} is already served by another process"
        f" (pid {os.getpid()}, user {me})",
    )


def test_a_stale_socket_is_left_to_the_usual_clean_up(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "ingest.sock"))
    stale.close()
    assert socket_holder(tmp_path / "ingest.sock") is None
    assert occupant(settings_in(tmp_path), []) is None


def test_a_popauth_on_the_ingest_socket_is_named_as_such(tmp_path: Path) -> None:
    endpoint = Endpoint(tmp_path)
    endpoint.server.start()
    try:
        found = occupant(settings_in(tmp_path), [])
    finally:
        endpoint.server.stop()
    assert found is not None and found.kind is Occupancy.RUNNING
    assert found.text.startswith(f"popauth already runs here (pid {os.getpid()}, user ")
    assert found.text.endswith(f"and serves {tmp_path / 'ingest.sock'}")


@needs_root
def test_a_state_directory_of_another_user(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(state, nobody.pw_uid, nobody.pw_gid)
    found = occupant(settings_in(tmp_path), [state / "whitelist.json"])
    assert found is not None and found.kind is Occupancy.FOREIGN_DIRECTORY
    assert found.text.startswith(f"{state} belongs to user nobody: another popauth keeps its state")


@needs_root
def test_a_socket_directory_this_user_cannot_write(open_tmp: Path) -> None:
    # As nobody, in a directory of root's: the sockets could not be made.
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            nobody = pwd.getpwnam("nobody")
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            seen = occupant(settings_in(open_tmp), [])
            os.write(writer, (f"{seen.kind.value}: {seen.text}" if seen else "None").encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        found = pipe.read()
    os.waitpid(child, 0)
    assert found == (
        f"foreign_directory: {open_tmp} belongs to user root, and this popauth (nobody)"
        " cannot put its sockets there"
    )
