from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from popauth.basics.addresses import parse_client_address
from popauth.basics.errors import ConfigError
from popauth.config import (
    KEYS,
    LEARNED_UNLESS_SET,
    ListenAddress,
    Settings,
    load_settings,
    settings_from_mapping,
)
from popauth.config.effective import toml_of
from popauth.localdelivery import LocalDelivery
from popauth.localdelivery.resolve import resolve_local_delivery
from popauth.relay.accounting import Accounting
from popauth.relay.decision import PopFirst, RelayBudget
from popauth.store import StoreKind
from popauth.telemetry.levels import LogFormat, LogLevel

CONTRIB = Path(__file__).parents[2] / "contrib" / "popauth.toml"


def test_every_key_is_named_once_and_every_default_converts_to_itself() -> None:
    names = [key.name for key in KEYS.values()]
    assert len(names) == len(set(names)) == len(KEYS)
    # Each default as check-config --show writes it in TOML.
    for key in KEYS.values():
        if key.name not in LEARNED_UNLESS_SET:
            assert key.convert(toml_of(key, key.default)) == key.default, key.name


def test_embedded_defaults() -> None:
    settings = load_settings(None)
    assert settings.store.ttl == 900
    assert settings.store.kind is StoreKind.MEMORY
    assert settings.milter.socket.startswith("unix:")
    assert settings.ingest.socket_mode == 0o660
    assert settings.store.ipv6_prefix == 128
    assert settings.socketmap.socket is None
    assert settings.metrics.listen is None
    assert settings.accounts.accounting is Accounting.MESSAGES
    assert settings.log.format is LogFormat.CONSOLE
    assert settings.log.level is LogLevel.INFO
    assert settings.local.local_domains is None  # learned from the MTA
    assert settings.local.local_mailers is None
    assert settings.local.learn_from_mta == "auto"
    policy = settings.relay.policy(LocalDelivery.configured(["local.test"], ["local"]))
    assert policy.pop_first is PopFirst.ON
    assert parse_client_address("127.0.0.1") in policy.trusted_networks
    assert parse_client_address("::1") in policy.trusted_networks
    assert parse_client_address("192.0.2.1") not in policy.trusted_networks


def test_loads_toml_into_typed_groups(tmp_path: Path) -> None:
    path = tmp_path / "popauth.toml"
    path.write_text(
        'milter_socket = "inet:8894@127.0.0.1"\n'
        "ttl = 60\n"
        'ingest_socket_mode = "0600"\n'
        'trusted_networks = ["10.0.0.0/8"]\n'
        'local_domains = ["Example.ORG", ".hosted.example"]\n'
        'local_mailers = ["local", "Virtual"]\n'
        'log_format = "json"\n'
        'store = "redis"\n'
        'pop_first = "warn"\n'
        'accounting = "recipients"\n'
        'snapshot_path = ""\n'
        'metrics_listen = "[::1]:9754"\n'
    )
    settings = load_settings(path)
    assert settings.store.ttl == 60
    assert settings.store.kind is StoreKind.REDIS
    assert settings.store.snapshot_path is None
    assert settings.ingest.socket_mode == 0o600
    assert settings.log.format is LogFormat.JSON
    assert settings.accounts.accounting is Accounting.RECIPIENTS
    assert settings.metrics.listen == ListenAddress("::1", 9754)
    assert str(settings.metrics.listen) == "[::1]:9754"
    policy = settings.relay.policy(resolve_local_delivery(settings.local))
    assert policy.pop_first is PopFirst.WARN
    (configured,) = policy.local_delivery.classes
    assert configured.mailers == frozenset({"local", "virtual"})
    assert configured.domains.contains_domain("a.hosted.example")
    assert configured.domains.contains_domain("example.org")
    assert parse_client_address("10.1.2.3") in policy.trusted_networks
    assert parse_client_address("127.0.0.1") not in policy.trusted_networks


def test_an_unset_group_keeps_its_defaults() -> None:
    settings = settings_from_mapping({"ttl": 60})
    assert settings.store.ttl == 60
    assert settings.milter == Settings().milter


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"tll": 900}, "tll"),
        ({"ttl": "900"}, "ttl"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"max_entries": -1}, "max_entries"),
        ({"milter_socket": "/run/x.sock"}, "milter_socket"),
        ({"milter_socket": "unix:/run/x.sock\n"}, "milter_socket"),
        ({"milter_name": "pop auth"}, "milter_name"),
        ({"ingest_socket": "relative.sock"}, "ingest_socket"),
        ({"ingest_socket": "/run/x.sock\n"}, "ingest_socket"),
        ({"trusted_networks": ["10.0.0.1/8"]}, "trusted_networks"),
        ({"trusted_networks": "10.0.0.0/8"}, "trusted_networks"),
        ({"trusted_networks": ["10.0.0.0/8\n"]}, "trusted_networks"),
        ({"local_domains": ["bad domain"]}, "local_domains"),
        ({"local_domains": ["example.org\n"]}, "local_domains"),
        ({"local_mailers": []}, "local_mailers"),
        ({"local_mailers": ["local\n"]}, "local_mailers"),
        ({"reject_message": "100% sure"}, "reject_message"),
        ({"reject_message": "line\nbreak"}, "reject_message"),
        ({"reject_message": "x" * 401}, "reject_message"),
        ({"redis_url": "redis://host/0\n"}, "redis_url"),
        ({"store": "Memory"}, "store"),
        ({"pop_first": "maybe"}, "pop_first"),
        ({"accounting": 1}, "accounting"),
        ({"log_format": "xml"}, "log_format"),
        ({"learn_from_mta": "exim"}, "learn_from_mta"),
        ({"learn_from_mta": ""}, "learn_from_mta"),
        ({"postfix_config_directory": "etc/postfix"}, "postfix_config_directory"),
        ({"sendmail_cf": "sendmail.cf"}, "sendmail_cf"),
        ({"sendmail_command": ""}, "sendmail_command"),
        ({"log_level": "info\n"}, "log_level"),
        ({"ipv6_prefix": 129}, "ipv6_prefix"),
        ({"ingest_socket_mode": "rw-rw----"}, "ingest_socket_mode"),
        ({"ingest_allowed_users": ["no-such-user-here"]}, "ingest_allowed_users"),
        ({"ingest_allowed_users": ["root\n"]}, "ingest_allowed_users"),
        ({"ingest_socket_group": "no-such-group-here"}, "ingest_socket_group"),
        ({"metrics_listen": "localhost:9754"}, "metrics_listen"),
        ({"metrics_listen": "127.0.0.1:0"}, "metrics_listen"),
        ({"metrics_listen": "127.0.0.1:9754\n"}, "metrics_listen"),
    ],
)
def test_bad_settings_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=repr(key)):
        settings_from_mapping(raw)


def test_a_misspelt_key_gets_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="did you mean 'ttl'"):
        settings_from_mapping({"tll": 900})


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("ttl = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"ttl = 3\n\xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(binary)


def test_a_key_set_twice_is_named(tmp_path: Path) -> None:
    # The README's snippet appended to a copy of contrib/popauth.toml, which sets it.
    path = tmp_path / "popauth.toml"
    path.write_text(
        CONTRIB.read_text() + '\ningest_allowed_users = [\n  "dovecot",\n]\nttl = 600\n'
    )
    with pytest.raises(
        ConfigError, match=r"'ingest_allowed_users' is set twice, on lines \d+ and \d+"
    ):
        load_settings(path)


def test_contrib_example_sets_only_an_operators_decisions() -> None:
    text = CONTRIB.read_text()
    active = tomllib.loads(text)
    suggested = re.findall(r"^#([a-z_]+) = ", text, re.MULTILINE)
    assert set(active) | set(suggested) <= set(KEYS)
    # Far fewer than the full reference, and no default pinned.
    assert len(active) + len(suggested) < len(KEYS) / 3
    settings = load_settings(CONTRIB)
    for name in active:
        assert KEYS[name].value_in(settings) != KEYS[name].default, name
    # Learned unless set: shown commented out, with an example value.
    for key in LEARNED_UNLESS_SET:
        assert f"\n#{key} = [" in text


# Issue 11, defect 7: settings that passed check-config and then failed or did harm.
@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"local_mailers": ["local\n"]}, "local_mailers"),
        ({"local_domains": ["example.org\n"]}, "local_domains"),
        ({"reject_message": "Check your mail first.\n"}, "reject_message"),
        ({"milter_name": "popauth\x00"}, "milter_name"),
        ({"milter_name": "pop auth"}, "milter_name"),
        ({"snapshot_path": "/var/lib/popauth/whitelist\x00.json"}, "snapshot_path"),
        ({"snapshot_path": "/"}, "snapshot_path"),
        ({"snapshot_path": "/var/lib/popauth/"}, "snapshot_path"),
        ({"snapshot_path": "/var/lib/popauth/.."}, "snapshot_path"),
        ({"snapshot_path": "/tmp"}, "snapshot_path"),
        ({"usage_path": "/"}, "usage_path"),
        ({"blocklist_path": "/var/lib/"}, "blocklist_path"),
        ({"metrics_listen": "10.0.0.0/8:9754"}, "metrics_listen"),
        ({"metrics_listen": "127.0.0.1:09754"}, "metrics_listen"),
        ({"metrics_listen": "127.0.0.1:0"}, "metrics_listen"),
        ({"metrics_listen": "127.0.0.1:65536"}, "metrics_listen"),
        ({"metrics_listen": "127.0.0.1:9754\n"}, "metrics_listen"),
        ({"metrics_listen": "::1:9754"}, "metrics_listen"),
        ({"metrics_listen": "[127.0.0.1]:9754"}, "metrics_listen"),
        ({"metrics_listen": "127.0.0.1:\u0669\u0669"}, "metrics_listen"),
        ({"milter_socket": "inet:99999@127.0.0.1"}, "milter_socket"),
        ({"milter_socket": "inet:0@127.0.0.1"}, "milter_socket"),
        ({"milter_socket": "inet:08894@127.0.0.1"}, "milter_socket"),
        ({"milter_socket": "inet:8894@::1"}, "milter_socket"),
        ({"milter_socket": "inet:8894@bad host"}, "milter_socket"),
        ({"milter_socket": "unix:/run/popauth/milter.sock\n"}, "milter_socket"),
        ({"milter_socket": "unix:/" + "m" * 120}, "milter_socket"),
        ({"ingest_socket": "/run/popauth/ingest.sock\n"}, "ingest_socket"),
        ({"ingest_socket": "/run/popauth/" + "i" * 100}, "ingest_socket"),
        ({"ingest_socket": "/"}, "ingest_socket"),
        ({"socketmap_socket": "/run/popauth/map\x1b.sock"}, "socketmap_socket"),
        ({"redis_url": "redis://127.0.0.1:99999/0"}, "redis_url"),
        ({"redis_url": "redis://127.0.0.1:6379/zero"}, "redis_url"),
        ({"redis_key_prefix": "popauth:\n"}, "redis_key_prefix"),
        ({"ingest_allowed_users": ["root\n"]}, "ingest_allowed_users"),
        ({"ingest_allowed_users": ["\u0661"]}, "ingest_allowed_users"),
        ({"ingest_socket_group": "\u0661"}, "ingest_socket_group"),
        ({"trusted_networks": ["10.0.0.0/8\n"]}, "trusted_networks"),
        ({"trusted_networks": [" 10.0.0.0/8"]}, "trusted_networks"),
        ({"allow_wide_trusted_networks": "yes"}, "allow_wide_trusted_networks"),
    ],
)
def test_check_config_refuses_what_would_fail_later(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=repr(key)):
        settings_from_mapping(raw)


@pytest.mark.parametrize(
    "network",
    ["0.0.0.0/0", "::/0", "0.0.0.0/1", "10.0.0.0/7", "2000::/3", "2000::/15", "::ffff:0:0/96"],
)
def test_trusted_network_covering_the_internet_is_refused(network: str) -> None:
    with pytest.raises(ConfigError, match=r"'trusted_networks'.*allow_wide_trusted_networks"):
        settings_from_mapping({"trusted_networks": ["127.0.0.0/8", network]})


@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0", "10.0.0.0/7"])
def test_a_wide_trusted_network_needs_the_setting_that_says_so(network: str) -> None:
    settings = settings_from_mapping(
        {"trusted_networks": [network], "allow_wide_trusted_networks": True}
    )
    assert settings.relay.allow_wide_trusted_networks is True
    assert len(list(settings.relay.trusted_networks)) == 1


@pytest.mark.parametrize(
    "raw",
    [
        {"trusted_networks": ["10.0.0.0/8", "2001:db8::/32", "2001::/16", "192.0.2.0/24"]},
        {"metrics_listen": "127.0.0.1:9754"},
        {"metrics_listen": "[::1]:9754"},
        {"metrics_listen": "0.0.0.0:65535"},
        {"milter_socket": "inet:8894@127.0.0.1"},
        {"milter_socket": "inet:8894@[127.0.0.1]"},
        {"milter_socket": "inet6:8894@::1"},
        {"milter_socket": "inet:8894@mx.example.org"},
        {"milter_socket": "inet:8894"},
        {"milter_socket": "local:/run/popauth/milter.sock"},
        {"redis_url": "unix:///run/redis/redis.sock?db=0"},
        {"redis_url": "rediss://user:secret@redis.example.org:6380/2"},
        {"ingest_allowed_users": ["0", "root"]},
        {"reject_message": "Check your mail (POP/IMAP) first."},
    ],
)
def test_good_settings_still_pass(raw: dict[str, Any]) -> None:
    settings = settings_from_mapping(raw)
    for name, value in raw.items():
        key = KEYS[name]
        typed = getattr(getattr(settings, key.group), key.field)
        assert typed is not None
        if isinstance(value, str):
            assert str(typed) == value


def test_metrics_address_of_an_ipv6_listener() -> None:
    listen = settings_from_mapping({"metrics_listen": "[::1]:9754"}).metrics.listen
    assert listen == ListenAddress("::1", 9754)


def test_check_config_names_the_key_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from popauth.cli import main

    path = tmp_path / "popauth.toml"
    path.write_text('snapshot_path = "/"\n')
    assert main(["check-config", str(path)]) != 0
    assert "'snapshot_path'" in capsys.readouterr().err


def test_sentinel_settings_are_validated() -> None:
    settings = settings_from_mapping(
        {
            "store": "redis",
            "redis_sentinels": ["10.0.0.1:26379", "sentinel.example.org:26380", "[2001:db8::3]:1"],
            "redis_sentinel_service": "mail-whitelist",
            "redis_sentinel_password": "secret",
        }
    )
    assert settings.store.sentinel_addresses() == (
        ("10.0.0.1", 26379),
        ("sentinel.example.org", 26380),
        ("2001:db8::3", 1),
    )
    for bad in (["10.0.0.1"], ["10.0.0.1:0"], ["2001:db8::3:26379"], ["bad host:1"], "x:1"):
        with pytest.raises(ConfigError, match="redis_sentinels"):
            settings_from_mapping({"redis_sentinels": bad})
    with pytest.raises(ConfigError, match="redis_sentinel_service"):
        settings_from_mapping({"redis_sentinel_service": ""})
    with pytest.raises(ConfigError, match="redis_sentinel_tls"):
        settings_from_mapping({"redis_sentinel_tls": "yes"})


def test_sentinel_tls_files_must_exist_and_fit_together(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(ConfigError, match="no such file"):
        settings_from_mapping({"redis_sentinel_tls": True, "redis_sentinel_tls_ca_file": "/nope"})
    with pytest.raises(ConfigError, match="needs redis_sentinel_tls = true"):
        settings_from_mapping({"redis_sentinel_tls_ca_file": str(ca)})
    with pytest.raises(ConfigError, match="go together"):
        settings_from_mapping({"redis_sentinel_tls": True, "redis_sentinel_tls_cert_file": str(ca)})
    settings = settings_from_mapping(
        {"redis_sentinel_tls": True, "redis_sentinel_tls_ca_file": str(ca)}
    )
    assert settings.store.redis_sentinel_tls_ca_file == str(ca)


def test_sentinels_and_wait_refuse_what_cannot_work() -> None:
    with pytest.raises(ConfigError, match="unix://"):
        settings_from_mapping(
            {"redis_sentinels": ["127.0.0.1:26379"], "redis_url": "unix:///run/redis.sock"}
        )
    with pytest.raises(ConfigError, match="shorter than redis_timeout"):
        settings_from_mapping({"redis_wait_replicas": 1, "redis_wait_timeout": 0.5})
    assert settings_from_mapping({"redis_wait_replicas": 1}).store.redis_wait_timeout == 0.1


def test_a_socket_path_under_a_directory_this_user_may_not_search(tmp_path: Path) -> None:
    # popauth check-config as a non-root user, the milter socket in Postfix's spool.
    from unittest import mock

    with mock.patch.object(Path, "is_dir", side_effect=PermissionError(13, "Permission denied")):
        settings = settings_from_mapping({"milter_socket": f"unix:{tmp_path}/private/milter.sock"})
    assert settings.milter.socket.endswith("milter.sock")


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, 'must be at least 1; "" turns the relay budget off'),
        (-5, "must be between 1 and 10000000"),
        (True, "must be an integer"),
        ("off", "must be an integer"),
    ],
)
def test_a_relay_budget_is_a_count_or_off(value: object, error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)):
        settings_from_mapping({"pop_first_max_recipients": value})


def test_the_relay_budget_reaches_the_policy_and_off_is_none() -> None:
    local = LocalDelivery.configured(["local.test"], ["local"])
    settings = settings_from_mapping({"pop_first_max_recipients": 5, "pop_first_budget_window": 60})
    assert settings.relay.policy(local).pop_first_budget == RelayBudget(5, 60)
    assert settings_from_mapping({}).relay.policy(local).pop_first_budget == RelayBudget(1000, 3600)
    off = settings_from_mapping({"pop_first_max_recipients": ""})
    assert off.relay.policy(local).pop_first_budget is None
