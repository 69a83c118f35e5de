"""The socketmap endpoint over a real UNIX socket, in-process."""

from __future__ import annotations

import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import CapturingLogger

from popauth.basics.addresses import WhitelistKeying, parse_client_address
from popauth.config import SocketmapSettings
from popauth.doors.socketmap import codec
from popauth.doors.socketmap.server import SocketmapServer
from popauth.store.memory import MemoryStore
from popauth.telemetry.metrics import Metrics
from tests.support.clock import FakeClock
from tests.support.logs import capturing_logger, events
from tests.support.mta_door import BlockingStore, FlakyStore, PersistentClient, serving


class Endpoint:
    def __init__(
        self,
        directory: Path,
        store_class: type[FlakyStore] = FlakyStore,
        *,
        lookup_events: bool = True,
        **limits: float,
    ) -> None:
        self.path = directory / "socketmap.sock"
        self.store = store_class(ttl=900, max_entries=1000, clock=FakeClock())
        self.log, self.sink = capturing_logger()
        self.metrics = Metrics()
        self.server = SocketmapServer(
            path=self.path,
            settings=SocketmapSettings(socket_mode=0o666, **limits),  # type: ignore[arg-type]
            store=self.store,
            keying=WhitelistKeying(64),
            metrics=self.metrics,
            log=self.log,
            lookup_events=lookup_events,
        )

    def connect(self) -> Connection:
        return Connection(self.path)

    def ask(self, key: str, name: str = "popauth") -> bytes:
        with self.connect() as connection:
            return connection.ask(f"{name} {key}".encode())


class Connection(PersistentClient):
    """A persistent socketmap client, as Postfix and Sendmail keep one."""

    def frame(self, payload: bytes) -> bytes:
        return codec.encode(payload)

    def split_reply(self, buffer: bytes) -> tuple[bytes, bytes] | None:
        return codec.decode(buffer, 100_000)


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[Endpoint]:
    with serving(Endpoint(tmp_path, timeout=0.5)) as server:
        yield server


def grant(endpoint: Endpoint, address: str) -> None:
    """What the ingest door does for ``LOGIN address alice``."""
    endpoint.store.grant(WhitelistKeying(64).key_address(parse_client_address(address)), "alice")


def test_hits_and_misses_normalised_like_the_milter(endpoint: Endpoint) -> None:
    assert endpoint.ask("192.0.2.1") == b"NOTFOUND "
    grant(endpoint, "192.0.2.1")
    assert endpoint.ask("192.0.2.1") == b"OK OK"
    assert endpoint.ask("::ffff:192.0.2.1") == b"OK OK"
    assert endpoint.ask("IPv6:::ffff:192.0.2.1") == b"OK OK"
    assert endpoint.ask("192.0.2.2") == b"NOTFOUND "
    grant(endpoint, "2001:db8:0:1::99")
    # ipv6_prefix = 64: the whole /64 is whitelisted, in either MTA's form.
    assert endpoint.ask("2001:db8:0:1::5") == b"OK OK"
    assert endpoint.ask("ipv6:2001:db8:0:1::5") == b"OK OK"
    assert endpoint.ask("2001:db8:0:2::5") == b"NOTFOUND "


def lookup_events(sink: CapturingLogger) -> list[dict[str, object]]:
    """The fields of each ``socketmap_lookup`` event, less the door's own."""
    return [
        {key: value for key, value in call.kwargs.items() if key not in ("event", "door")}
        for call in sink.calls
        if call.kwargs.get("event") == "socketmap_lookup"
    ]


def test_each_lookup_is_logged_when_asked_to(endpoint: Endpoint) -> None:
    grant(endpoint, "192.0.2.1")
    assert endpoint.ask("192.0.2.1") == b"OK OK"
    assert endpoint.ask("192.0.2.2") == b"NOTFOUND "
    assert lookup_events(endpoint.sink) == [
        {"client_ip": "192.0.2.1", "hit": True, "user": "alice", "users": ["alice"]},
        {"client_ip": "192.0.2.2", "hit": False},
    ]


def test_lookups_are_not_logged_otherwise_even_by_a_logger_that_takes_debug(
    tmp_path: Path,
) -> None:
    with serving(Endpoint(tmp_path, lookup_events=False)) as quiet:
        grant(quiet, "192.0.2.1")
        assert quiet.ask("192.0.2.1") == b"OK OK"
        assert quiet.ask("192.0.2.2") == b"NOTFOUND "
    assert lookup_events(quiet.sink) == []
    assert "socketmap_stopped" in events(quiet.sink)


def test_loose_forms_of_a_whitelisted_address_are_not_found(endpoint: Endpoint) -> None:
    # Issue 11, defect 11: these answered OK for the whitelisted 192.0.2.1.
    grant(endpoint, "192.0.2.1")
    for loose in ("192.0.2.1%eth0", "[192.0.2.1]", "IPv6:192.0.2.1", " 192.0.2.1"):
        assert endpoint.ask(loose) == b"NOTFOUND ", loose
    assert endpoint.ask("192.0.2.1") == b"OK OK"


@pytest.mark.parametrize(
    "key",
    [
        "unknown",
        "mx.example.org",
        "example.org",
        "192.0.2",
        "192.0",
        "192",
        "2001:db8:0:1",
        "2001:db8:0:0:0:0:0",
        "192.0.2.1.in-addr.arpa",
        "x" * 900,
    ],
)
def test_keys_that_are_not_addresses_are_not_found(endpoint: Endpoint, key: str) -> None:
    grant(endpoint, "192.0.2.1")
    lookups = endpoint.store.stats().lookups
    assert endpoint.ask(key) == b"NOTFOUND "
    assert endpoint.store.stats().lookups == lookups  # the store was not asked


def test_one_persistent_connection_many_requests(endpoint: Endpoint) -> None:
    with endpoint.connect() as connection:
        # Pipelined: three requests in one write, three replies in order.
        connection.send(
            b"".join(codec.encode(f"popauth {k}".encode()) for k in ("unknown", "a", "192.0.2.9"))
        )
        assert [connection.reply() for _ in range(3)] == [b"NOTFOUND "] * 3
        grant(endpoint, "192.0.2.9")  # a login is seen by the very next lookup
        assert connection.ask(b"popauth 192.0.2.9") == b"OK OK"
        endpoint.store.revoke(parse_client_address("192.0.2.9"))
        assert connection.ask(b"popauth 192.0.2.9") == b"NOTFOUND "


def test_well_framed_nonsense_gets_perm_and_the_connection_stays(endpoint: Endpoint) -> None:
    with endpoint.connect() as connection:
        assert connection.ask(b"sendmail 192.0.2.1") == b"PERM unknown map"
        assert connection.ask(b"popauth") == b"PERM request must be NAME KEY"
        assert connection.ask(b"") == b"PERM request must be NAME KEY"
        assert connection.ask(b"popauth ").startswith(b"PERM ")
        assert connection.ask(b"popauth \xff\xfe").startswith(b"PERM ")
        assert connection.ask(b"popauth 192.0.2.1\x00").startswith(b"PERM ")
        assert connection.ask(b"popauth 192.0.2.1") == b"NOTFOUND "
    assert endpoint.metrics.socketmap_totals()["perm"] == 6


@pytest.mark.parametrize(
    "raw",
    [
        b"3:abcX",  # missing comma
        b"x:abc,",  # not a length
        b"popauth 192.0.2.1\n",  # a line, not a netstring
        b"03:abc,",  # leading zero
        b"1001:" + b"x" * 1001 + b",",  # over the limit
        b"99999999999999999999:",  # absurd length
        b":,",  # empty length
    ],
)
def test_bad_framing_gets_perm_then_close_and_others_are_served(
    endpoint: Endpoint, raw: bytes
) -> None:
    grant(endpoint, "192.0.2.1")
    with endpoint.connect() as connection:
        connection.send(raw)
        assert connection.reply().startswith(b"PERM bad netstring: ")
        assert connection.closed()
    assert endpoint.ask("192.0.2.1") == b"OK OK"
    assert "socketmap_rejected" in events(endpoint.sink)


def test_a_request_that_stalls_times_out(endpoint: Endpoint) -> None:
    with endpoint.connect() as connection:
        connection.send(b"17:popauth 19")
        assert endpoint.ask("unknown") == b"NOTFOUND "  # others are served meanwhile
        assert connection.reply() == b"TIMEOUT no complete request in time"
        assert connection.closed()


def test_idle_connections_are_closed_quietly(tmp_path: Path) -> None:
    with serving(Endpoint(tmp_path, idle_timeout=1.0)) as idle, idle.connect() as connection:
        assert connection.ask(b"popauth unknown") == b"NOTFOUND "
        assert connection.closed()  # after idle_timeout, with no reply


def test_client_hangs_up_mid_request(endpoint: Endpoint) -> None:
    with endpoint.connect() as connection:
        connection.send(b"17:popauth 192")
    assert endpoint.ask("unknown") == b"NOTFOUND "


@pytest.mark.parametrize("store_class", [FlakyStore, BlockingStore])
def test_store_unavailable_is_temp_never_ok(tmp_path: Path, store_class: type[FlakyStore]) -> None:
    with serving(Endpoint(tmp_path, store_class=store_class)) as flaky:
        grant(flaky, "192.0.2.1")
        with flaky.connect() as connection:
            assert connection.ask(b"popauth 192.0.2.1") == b"OK OK"
            flaky.store.down = True
            assert connection.ask(b"popauth 192.0.2.1") == b"TEMP whitelist store unavailable"
            assert connection.ask(b"popauth unknown") == b"NOTFOUND "
            flaky.store.down = False
            assert connection.ask(b"popauth 192.0.2.1") == b"OK OK"
        assert "socketmap_store_unavailable" in events(flaky.sink)


@pytest.mark.parametrize("store_class", [FlakyStore, BlockingStore])
def test_many_concurrent_persistent_clients(tmp_path: Path, store_class: type[FlakyStore]) -> None:
    busy = Endpoint(tmp_path, store_class=store_class)
    busy.server.start()
    for n in range(0, 64, 2):
        grant(busy, f"10.0.0.{n}")
    failures: list[str] = []
    start = threading.Barrier(64)

    def client(n: int) -> None:
        with busy.connect() as connection:
            start.wait()
            for _ in range(50):
                expected = b"OK OK" if n % 2 == 0 else b"NOTFOUND "
                for key, want in ((f"10.0.0.{n}", expected), ("unknown", b"NOTFOUND ")):
                    reply = connection.ask(f"popauth {key}".encode())
                    if reply != want:
                        failures.append(f"{n} {key}: {reply!r}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(64)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        busy.server.stop()
    assert failures == []
    assert busy.metrics.socketmap_totals()["requests"] == 64 * 100


def test_too_many_clients_get_temp(tmp_path: Path) -> None:
    with serving(Endpoint(tmp_path, max_clients=2)) as capped:
        held = [capped.connect(), capped.connect()]
        for connection in held:  # both served, and both in the middle of a request
            connection.send(codec.encode(b"popauth unknown") + b"15:popauth")
            assert connection.reply() == b"NOTFOUND "
        with capped.connect() as third:
            assert third.ask(b"popauth 192.0.2.1") == b"TEMP too many clients, try again"
            assert third.closed()
        held[0].socket.close()
        # A freed slot is usable again (poll: the server notices the close).
        for _ in range(200):
            with capped.connect() as again:
                if again.ask(b"popauth unknown") == b"NOTFOUND ":
                    break
        else:
            pytest.fail("the freed slot never came back")
        held[1].socket.close()


def test_ok_value_and_name_are_configurable(tmp_path: Path) -> None:
    store = MemoryStore(ttl=900, max_entries=10, clock=FakeClock())
    log, _ = capturing_logger()
    server = SocketmapServer(
        path=tmp_path / "s.sock",
        settings=SocketmapSettings(socket_mode=0o600, name="relayclients", ok_value="RELAY"),
        store=store,
        keying=WhitelistKeying(),
        metrics=Metrics(),
        log=log,
        lookup_events=True,
    )
    server.start()
    try:
        store.grant(parse_client_address("192.0.2.1"), "alice")
        with Connection(tmp_path / "s.sock") as connection:
            assert connection.ask(b"relayclients 192.0.2.1") == b"OK RELAY"
            assert connection.ask(b"popauth 192.0.2.1") == b"PERM unknown map"
        assert stat.S_IMODE((tmp_path / "s.sock").stat().st_mode) == 0o600
    finally:
        server.stop()
    assert not (tmp_path / "s.sock").exists()


def test_stop_ends_persistent_connections(tmp_path: Path) -> None:
    endpoint = Endpoint(tmp_path)
    endpoint.server.start()
    connections = [endpoint.connect() for _ in range(3)]
    for connection in connections:
        assert connection.ask(b"popauth unknown") == b"NOTFOUND "
    endpoint.server.stop()
    for connection in connections:
        assert connection.closed()  # closed by the server, not left pending
        connection.socket.close()
    assert endpoint.server.clients == 0
    assert not endpoint.path.exists()


def test_outcomes_are_exported_as_metrics(endpoint: Endpoint) -> None:
    endpoint.store.grant(parse_client_address("192.0.2.1"), "alice")
    assert endpoint.ask("192.0.2.1") == b"OK OK"
    assert endpoint.ask("192.0.2.2") == b"NOTFOUND "
    assert endpoint.ask("unknown") == b"NOTFOUND "
    registry = endpoint.metrics.registry

    def sample(result: str) -> float | None:
        return registry.get_sample_value("popauth_socketmap_requests_total", {"result": result})

    assert (sample("requests"), sample("hits"), sample("misses")) == (3, 1, 1)
    assert sample("not_an_address") == 1
