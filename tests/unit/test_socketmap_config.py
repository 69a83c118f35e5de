"""The socketmap settings: off by default, validated, wired by serve."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from popauth.basics.addresses import WhitelistKeying, parse_client_address
from popauth.basics.errors import ConfigError
from popauth.config import Settings, settings_from_mapping
from popauth.daemon.serve import socketmap_server
from popauth.doors.socketmap import codec
from popauth.store.memory import MemoryStore
from popauth.telemetry.metrics import Metrics
from tests.support.clock import FakeClock
from tests.support.logs import capturing_logger, events


def test_off_by_default() -> None:
    settings = Settings()
    assert settings.socketmap.socket is None
    store = MemoryStore(ttl=900, max_entries=10, clock=FakeClock())
    log, _ = capturing_logger()
    assert socketmap_server(settings, store, WhitelistKeying(), Metrics(), log) is None


def test_configured(tmp_path: Path) -> None:
    settings = settings_from_mapping(
        {
            "socketmap_socket": str(tmp_path / "s.sock"),
            "socketmap_socket_mode": "0600",
            "socketmap_name": "relay-clients",
            "socketmap_ok_value": "RELAY",
            "socketmap_max_clients": 4,
        }
    )
    store = MemoryStore(ttl=900, max_entries=10, clock=FakeClock())
    log, _ = capturing_logger()
    server = socketmap_server(settings, store, WhitelistKeying(), Metrics(), log)
    assert server is not None
    assert server.path == tmp_path / "s.sock"


@pytest.mark.parametrize(("level", "logged"), [("debug", True), ("info", False)])
def test_each_lookup_is_logged_at_log_level_debug_only(
    tmp_path: Path, level: str, logged: bool
) -> None:
    settings = settings_from_mapping(
        {"socketmap_socket": str(tmp_path / "s.sock"), "log_level": level}
    )
    store = MemoryStore(ttl=900, max_entries=10, clock=FakeClock())
    store.grant(parse_client_address("192.0.2.1"), "alice")
    log, sink = capturing_logger()
    server = socketmap_server(settings, store, WhitelistKeying(), Metrics(), log)
    assert server is not None
    server.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(str(tmp_path / "s.sock"))
            client.sendall(codec.encode(b"popauth 192.0.2.1"))
            assert client.recv(100) == codec.encode(b"OK OK")
    finally:
        server.stop()
    assert ("socketmap_lookup" in events(sink)) is logged


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"socketmap_socket": "relative.sock"}, "socketmap_socket"),
        ({"socketmap_socket_mode": "rw"}, "socketmap_socket_mode"),
        ({"socketmap_socket_group": "no-such-group-here"}, "socketmap_socket_group"),
        ({"socketmap_name": "pop auth"}, "socketmap_name"),
        ({"socketmap_name": ""}, "socketmap_name"),
        ({"socketmap_ok_value": ""}, "socketmap_ok_value"),
        ({"socketmap_ok_value": "OK\n"}, "socketmap_ok_value"),
        ({"socketmap_ok_value": " OK"}, "socketmap_ok_value"),
        ({"socketmap_timeout": 0}, "socketmap_timeout"),
        ({"socketmap_idle_timeout": "long"}, "socketmap_idle_timeout"),
        ({"socketmap_max_clients": 0}, "socketmap_max_clients"),
    ],
)
def test_bad_values_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        settings_from_mapping(raw)
