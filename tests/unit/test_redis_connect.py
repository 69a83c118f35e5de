"""How the Redis client is built: sentinel credentials and TLS go where they belong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from redis.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection

from popauth.basics.addresses import parse_client_address
from popauth.basics.clock import SystemClock
from popauth.config import StoreSettings
from popauth.store import StoreUnavailable
from popauth.store.redis import (
    RedisStore,
    connect,
    sentinel_connection_options,
    unix_connections_take_a_connect_timeout,
)


def test_sentinel_options_carry_their_own_password_and_tls() -> None:
    settings = StoreSettings(
        redis_sentinels=("127.0.0.1:26379",),
        redis_sentinel_service="popauth",
        redis_sentinel_username="watcher",
        redis_sentinel_password="sentinel-secret",
        redis_sentinel_tls=True,
        redis_sentinel_tls_ca_file="/etc/ssl/ca.pem",
        redis_sentinel_tls_cert_file="/etc/ssl/client.pem",
        redis_sentinel_tls_key_file="/etc/ssl/client.key",
    )
    options = sentinel_connection_options(settings, 0.3)
    assert options["password"] == "sentinel-secret"
    assert options["username"] == "watcher"
    assert options["ssl"] is True
    assert options["ssl_ca_certs"] == "/etc/ssl/ca.pem"
    assert (options["ssl_certfile"], options["ssl_keyfile"]) == (
        "/etc/ssl/client.pem",
        "/etc/ssl/client.key",
    )
    assert options["socket_timeout"] == options["socket_connect_timeout"] == 0.3
    plain = StoreSettings(redis_sentinels=("127.0.0.1:26379",), redis_sentinel_service="popauth")
    assert not {"password", "ssl"} & set(sentinel_connection_options(plain, 1))


def test_the_master_takes_password_database_and_tls_from_the_url() -> None:
    sentinels = StoreSettings(
        redis_sentinels=("127.0.0.1:26379",),
        redis_sentinel_service="popauth",
        redis_sentinel_password="sentinel-secret",
    )
    client = connect("rediss://:master-secret@ignored:1/3", 0.3, sentinels)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "popauth"
    assert pool.connection_class is SentinelManagedSSLConnection
    kwargs = pool.connection_kwargs
    assert (kwargs["password"], kwargs["db"]) == ("master-secret", 3)
    assert "host" not in kwargs  # the sentinels name the master
    # The sentinel password is not sent to the master, nor the master's to the sentinels.
    sentinel_kwargs = pool.sentinel_manager.sentinel_kwargs
    assert sentinel_kwargs["password"] == "sentinel-secret"


def test_a_unix_url_bounds_the_connect_and_every_read_by_the_timeout(tmp_path: Path) -> None:
    # redis-py 4.3 refused socket_connect_timeout for a UNIX socket (a TypeError
    # at the first command); later ones take it, and need it.
    client = connect(f"unix://{tmp_path}/redis.sock?db=2", 0.3)
    connection: Any = client.connection_pool.make_connection()  # the interface declares no timeouts
    assert connection.socket_timeout == 0.3
    if unix_connections_take_a_connect_timeout():
        assert connection.socket_connect_timeout == 0.3


def test_a_unix_socket_that_is_not_there_is_an_outage_not_a_crash(tmp_path: Path) -> None:
    store = RedisStore(
        client=connect(f"unix://{tmp_path}/redis.sock", 0.3),
        ttl=900,
        key_prefix="popauth:",
        clock=SystemClock(),
    )
    with pytest.raises(StoreUnavailable):
        store.lookup(parse_client_address("192.0.2.1"))
    assert not store.ping()
