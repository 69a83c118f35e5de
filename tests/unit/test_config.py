from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from popauth.addresses import parse_client_address
from popauth.config import VALIDATORS, ConfigError, Settings, load_settings, settings_from_mapping


def test_every_setting_has_a_validator() -> None:
    assert set(VALIDATORS) == {f.name for f in dataclasses.fields(Settings)}


def test_embedded_defaults() -> None:
    settings = load_settings(None)
    assert settings.ttl == 900
    assert settings.milter_socket.startswith("unix:")
    assert settings.ingest_socket_mode == 0o660
    assert settings.ipv6_prefix == 128
    policy = settings.relay_policy()
    assert parse_client_address("127.0.0.1") in policy.trusted_networks
    assert parse_client_address("::1") in policy.trusted_networks
    assert parse_client_address("192.0.2.1") not in policy.trusted_networks


def test_loads_toml(tmp_path: Path) -> None:
    path = tmp_path / "popauth.toml"
    path.write_text(
        'milter_socket = "inet:8894@127.0.0.1"\n'
        "ttl = 60\n"
        'ingest_socket_mode = "0600"\n'
        'trusted_networks = ["10.0.0.0/8"]\n'
        'local_domains = ["Example.ORG", ".hosted.example"]\n'
        'local_mailers = ["local", "Virtual"]\n'
        'log_format = "json"\n'
    )
    settings = load_settings(path)
    assert settings.ttl == 60
    assert settings.ingest_socket_mode == 0o600
    assert settings.milter_socket_path() is None
    assert settings.local_domains == ("example.org", ".hosted.example")
    policy = settings.relay_policy()
    assert policy.local_mailers == frozenset({"local", "virtual"})
    assert "a.hosted.example" in policy.local_domains


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"tll": 900}, "tll"),
        ({"ttl": "900"}, "ttl"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"max_entries": -1}, "max_entries"),
        ({"milter_socket": "/run/x.sock"}, "milter_socket"),
        ({"ingest_socket": "relative.sock"}, "ingest_socket"),
        ({"trusted_networks": ["10.0.0.1/8"]}, "trusted_networks"),
        ({"trusted_networks": "10.0.0.0/8"}, "trusted_networks"),
        ({"local_domains": ["bad domain"]}, "local_domains"),
        ({"local_mailers": []}, "local_mailers"),
        ({"reject_message": "100% sure"}, "reject_message"),
        ({"reject_message": "line\nbreak"}, "reject_message"),
        ({"log_format": "xml"}, "log_format"),
        ({"ipv6_prefix": 129}, "ipv6_prefix"),
        ({"ingest_socket_mode": "rw-rw----"}, "ingest_socket_mode"),
        ({"ingest_allowed_users": ["no-such-user-here"]}, "ingest_allowed_users"),
        ({"ingest_socket_group": "no-such-group-here"}, "ingest_socket_group"),
    ],
)
def test_bad_settings_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=repr(key)):
        settings_from_mapping(raw)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("ttl = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)


def test_contrib_example_lists_every_setting_with_its_default() -> None:
    import tomllib

    path = Path(__file__).parents[2] / "contrib" / "popauth.toml"
    assert set(tomllib.loads(path.read_text())) == set(VALIDATORS)
    assert load_settings(path) == Settings()
