"""A real ``popauth serve`` whose block list lives on a filesystem that
refuses writes: read-only, or full.

popauth runs in a private mount namespace (``unshare -m``) where its state
directory is a read-only bind mount or a tiny tmpfs filled to the brim; the
rest of the machine never sees either mount. A block or an unblock that
cannot be written must be refused with ``ERR unavailable``, logged, and
change nothing: not the block list, not the whitelist.
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.popauth import PopauthServer

UNSHARE = shutil.which("unshare")


def in_private_mounts(script: str) -> list[str]:
    """A wrapper that runs ``script`` in a private mount namespace, then execs popauth."""
    assert UNSHARE, "unshare (util-linux) is missing: run scripts/bootstrap"
    return [
        UNSHARE,
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-ec",
        f'{script}\nexec "$@"',
        "sh",
    ]


def read_only(directory: Path) -> list[str]:
    quoted = shlex.quote(str(directory))
    return in_private_mounts(
        f"mount --bind {quoted} {quoted}\nmount -o remount,bind,ro {quoted} {quoted}"
    )


def full(directory: Path, blocked: list[str]) -> list[str]:
    quoted = shlex.quote(str(directory))
    document = shlex.quote(
        json.dumps({"format": "popauth-blocklist", "version": 1, "users": blocked})
    )
    return in_private_mounts(
        f"mount -t tmpfs -o size=16k,mode=0700 popauth-full {quoted}\n"
        f"printf '%s' {document} > {quoted}/blocked.json\n"
        # Fill every remaining block (dd stops at ENOSPC, which is the point).
        f"dd if=/dev/zero of={quoted}/filler bs=1k 2>/dev/null || true"
    )


def write_block_list(directory: Path, users: list[str]) -> None:
    (directory / "blocked.json").write_text(
        json.dumps({"format": "popauth-blocklist", "version": 1, "users": users})
    )


@pytest.fixture
def state(open_tmp: Path) -> Iterator[Path]:
    directory = open_tmp / "state"
    directory.mkdir(mode=0o700)
    yield directory


def assert_refused_and_logged(server: PopauthServer, line: str, verb: str) -> None:
    reply = server.ask(line)
    assert reply == ["ERR unavailable block list cannot be saved, nothing changed"], reply
    failures = server.events("blocklist_write_failed")
    assert [event["verb"] for event in failures] == [verb]
    assert "cannot write" in failures[0]["error"]


@pytest.mark.parametrize("filesystem", ["read-only", "full"])
def test_block_on_an_unwritable_filesystem_is_refused_and_revokes_nothing(
    open_tmp: Path, state: Path, filesystem: str
) -> None:
    wrapper = read_only(state) if filesystem == "read-only" else full(state, [])
    if filesystem == "read-only":
        write_block_list(state, [])
    server = PopauthServer(open_tmp, wrapper=wrapper, blocklist_path=str(state / "blocked.json"))
    with server:
        assert server.ask("LOGIN 192.0.2.1 mallory")[0].startswith("OK ")
        assert_refused_and_logged(server, "BLOCK mallory", "BLOCK")
        assert server.ask("BLOCKED") == ["OK count=0"]
        # Not half done: mallory was not blocked, so mallory's entry stays.
        assert server.ask("QUERY 192.0.2.1")[0].startswith("OK address=192.0.2.1 user=mallory")
        assert server.ask("LOGIN 192.0.2.2 mallory")[0].startswith("OK ")
        assert server.ask("PING") == ["OK pong"]
    assert server.process is None


@pytest.mark.parametrize("filesystem", ["read-only", "full"])
def test_unblock_on_an_unwritable_filesystem_keeps_the_block(
    open_tmp: Path, state: Path, filesystem: str
) -> None:
    if filesystem == "read-only":
        write_block_list(state, ["mallory"])
        wrapper = read_only(state)
    else:
        wrapper = full(state, ["mallory"])
    server = PopauthServer(open_tmp, wrapper=wrapper, blocklist_path=str(state / "blocked.json"))
    with server:
        assert server.ask("BLOCKED") == ["OK count=1", "user=mallory"]
        assert_refused_and_logged(server, "UNBLOCK mallory", "UNBLOCK")
        assert server.ask("BLOCKED") == ["OK count=1", "user=mallory"]
        assert server.ask("LOGIN 192.0.2.1 mallory") == ["ERR blocked user mallory is blocked"]


def test_a_block_that_was_acknowledged_survives_a_restart(open_tmp: Path, state: Path) -> None:
    """The counterpart on a writable disk: OK means it is on disk."""
    settings = {"blocklist_path": str(state / "blocked.json")}
    with PopauthServer(open_tmp, **settings) as server:
        server.ask("LOGIN 192.0.2.1 mallory")
        assert server.ask("BLOCK mallory") == ["OK user=mallory revoked=1 blocked=new"]
        server.kill()  # no clean stop: only what was written counts
    with PopauthServer(open_tmp, **settings) as server:
        assert server.ask("BLOCKED") == ["OK count=1", "user=mallory"]
        assert server.ask("LOGIN 192.0.2.1 mallory") == ["ERR blocked user mallory is blocked"]
