"""How the Redis client is built: sentinel credentials and TLS go where they belong."""

from __future__ import annotations

from redis.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection

from popauth.store.redis import SentinelSettings, connect


def test_sentinel_options_carry_their_own_password_and_tls() -> None:
    settings = SentinelSettings(
        addresses=(("127.0.0.1", 26379),),
        service="popauth",
        username="watcher",
        password="sentinel-secret",
        tls=True,
        tls_ca_file="/etc/ssl/ca.pem",
        tls_cert_file="/etc/ssl/client.pem",
        tls_key_file="/etc/ssl/client.key",
    )
    options = settings.connection_options(0.3)
    assert options["password"] == "sentinel-secret"
    assert options["username"] == "watcher"
    assert options["ssl"] is True
    assert options["ssl_ca_certs"] == "/etc/ssl/ca.pem"
    assert (options["ssl_certfile"], options["ssl_keyfile"]) == (
        "/etc/ssl/client.pem",
        "/etc/ssl/client.key",
    )
    assert options["socket_timeout"] == options["socket_connect_timeout"] == 0.3
    plain = SentinelSettings(addresses=(("127.0.0.1", 26379),), service="popauth")
    assert not {"password", "ssl"} & set(plain.connection_options(1))


def test_the_master_takes_password_database_and_tls_from_the_url() -> None:
    sentinels = SentinelSettings(
        addresses=(("127.0.0.1", 26379),), service="popauth", password="sentinel-secret"
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
