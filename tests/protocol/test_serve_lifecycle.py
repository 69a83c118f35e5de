"""``popauth serve`` as systemd runs it: READY=1, SIGHUP, a fast stop, rollback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from miltertest import MilterConnection
from miltertest import constants as mc

from harness.popauth import POPAUTH, PopauthServer


def accepts(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def negotiates(path: Path) -> bool:
    """A whole option negotiation with the milter, as an MTA starts it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        # Without SETSYMLIST, which miltertest cannot decode.
        actions, _ = MilterConnection(sock).optneg_mta(
            actions=mc.SMFI_V6_ACTS & ~mc.SMFIF_SETSYMLIST
        )
        return isinstance(actions, int)


@pytest.fixture
def notify_socket(tmp_path: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(f"\0popauth-test-notify-{os.getpid()}-{tmp_path.name}")
    listener.settimeout(15)
    return listener


def start_under_notify(
    tmp_path: Path, notify_socket: socket.socket, **settings: Any
) -> PopauthServer:
    server = PopauthServer(tmp_path, socketmap_socket=str(tmp_path / "socketmap.sock"), **settings)
    name = notify_socket.getsockname()
    server.environment = {"NOTIFY_SOCKET": "@" + name[1:].decode()}
    return server


def test_ready_comes_after_every_socket_listens(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    server = start_under_notify(tmp_path, notify_socket)
    server.launch()
    try:
        assert notify_socket.recv(64) == b"READY=1"
        # At the moment READY arrives, every door already accepts.
        assert accepts(server.milter_path)
        assert accepts(server.ingest_path)
        assert accepts(tmp_path / "socketmap.sock")
        assert server.ask("PING") == ["OK pong"]
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        assert notify_socket.recv(64) == b"STOPPING=1"
    finally:
        assert server.stop() == 0


def test_sighup_does_not_stop_the_milter(tmp_path: Path, notify_socket: socket.socket) -> None:
    server = start_under_notify(tmp_path, notify_socket)
    server.launch()
    try:
        assert notify_socket.recv(64) == b"READY=1"
        assert server.process is not None
        # One at a time, as an operator or systemctl reload sends them.
        for count in range(1, 6):
            server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while len(server.events("reloaded")) < count and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(server.events("reloaded")) == count
        # Had libmilter taken a HUP, its stop flag would be set: a connection
        # wakes its listener, which would then return and popauth would exit.
        assert negotiates(server.milter_path)
        assert negotiates(server.milter_path)
        with pytest.raises(subprocess.TimeoutExpired):
            server.process.wait(1.0)
        assert server.ask("PING") == ["OK pong"]
    finally:
        assert server.stop() == 0
    assert not server.events("milter_stopped_unexpectedly")


def test_sigterm_stops_within_a_second_and_saves_the_snapshot(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    snapshot = tmp_path / "state" / "whitelist.json"
    server = start_under_notify(
        tmp_path, notify_socket, snapshot_path=str(snapshot), snapshot_interval=3600
    )
    server.launch()
    assert notify_socket.recv(64) == b"READY=1"
    assert server.ask("LOGIN 192.0.2.7 alice")[0].startswith("OK ")
    assert server.process is not None
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    status = server.process.wait(10)
    elapsed = time.monotonic() - started
    server.process = None
    assert status == 0
    assert elapsed < 1.5, elapsed
    entries = json.loads(snapshot.read_text())["entries"]
    assert [entry[:2] for entry in entries] == [["192.0.2.7", "alice"]]
    assert not server.milter_path.exists()
    assert not server.ingest_path.exists()


def test_a_blocked_socketmap_path_rolls_back_the_start(tmp_path: Path) -> None:
    blocked = tmp_path / "socketmap.sock"
    blocked.write_text("not a socket")
    server = PopauthServer(tmp_path, socketmap_socket=str(blocked))
    server.config_path.write_text(server.config_text())
    completed = subprocess.run(
        [POPAUTH, "serve", "--config", str(server.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert completed.returncode == 2
    assert "cannot start" in completed.stderr and "not a socket" in completed.stderr
    assert "start_failed" in completed.stdout + completed.stderr
    # The ingest socket started before the socketmap: it is gone again, and
    # the milter never started. Nothing is left listening.
    assert not server.ingest_path.exists()
    assert not accepts(server.ingest_path)
    assert not server.milter_path.exists()
    assert blocked.read_text() == "not a socket"


def test_sighup_during_the_start_does_not_stop_the_milter(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    server = start_under_notify(tmp_path, notify_socket)
    server.launch()
    assert server.process is not None
    try:
        # As soon as the milter socket exists, before READY=1.
        deadline = time.monotonic() + 15
        while not server.milter_path.exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        server.process.send_signal(signal.SIGHUP)
        assert notify_socket.recv(64) == b"READY=1"
        deadline = time.monotonic() + 10
        while not server.events("reloaded") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.events("reloaded")
        assert negotiates(server.milter_path)
        with pytest.raises(subprocess.TimeoutExpired):
            server.process.wait(1.0)
    finally:
        assert server.stop() == 0
    assert not server.events("milter_stopped_unexpectedly")


def test_the_policy_door_starts_after_the_socketmap_and_is_gone_at_stop(tmp_path: Path) -> None:
    policy = tmp_path / "policy.sock"
    server = PopauthServer(
        tmp_path,
        socketmap_socket=str(tmp_path / "socketmap.sock"),
        policy_socket=str(policy),
        log_level="debug",
    ).start()
    try:
        assert accepts(policy)
        started = [e["component"] for e in server.events("started")]
        assert started.index("socketmap") < started.index("policy") < started.index("milter")
        assert server.events("starting")[0]["policy_socket"] == str(policy)
    finally:
        assert server.stop() == 0
    assert not policy.exists()
    assert [e["event"] for e in server.events() if e["event"] == "policy_stopped"]


def test_a_blocked_policy_path_rolls_back_the_start(tmp_path: Path) -> None:
    blocked = tmp_path / "policy.sock"
    blocked.write_text("not a socket")
    server = PopauthServer(tmp_path, policy_socket=str(blocked))
    server.config_path.write_text(server.config_text())
    completed = subprocess.run(
        [POPAUTH, "serve", "--config", str(server.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert completed.returncode == 2
    assert "not a socket" in completed.stderr
    assert not server.ingest_path.exists()
    assert not server.milter_path.exists()
    assert blocked.read_text() == "not a socket"
