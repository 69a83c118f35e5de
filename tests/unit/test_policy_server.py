"""The policy door over a real UNIX socket, in-process, with the real gate."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import CapturingLogger

from popauth.basics.addresses import WhitelistKeying, parse_client_address
from popauth.config import PolicySettings, settings_from_mapping
from popauth.doors.policy import codec
from popauth.doors.policy.server import PolicyServer
from popauth.localdelivery import LocalDelivery
from popauth.relay.accounting import Accounting
from popauth.relay.gate import RelayGate
from popauth.relay.replies import Replies
from popauth.store.accounts import UsageLedger
from popauth.telemetry.metrics import Metrics
from tests.support.clock import FakeClock
from tests.support.logs import capturing_logger, events
from tests.support.mta_door import BlockingStore, FlakyStore, PersistentClient, serving

REMOTE = "someone@remote.example"
DENIED = b"action=550 5.7.1 Relaying denied. Use SMTP AUTH.\n\n"
FAILED = b"action=451 4.3.0 Relay check failed, try again later\n\n"
UNAVAILABLE = b"action=451 4.3.0 Relay check unavailable, try again later\n\n"
PERMIT = b"action=OK\n\n"


def request(
    client: str = "192.0.2.7",
    recipient: str = REMOTE,
    sender: str | None = "alice@local.test",
    *,
    state: str = "RCPT",
    sasl: str = "",
    instance: str = "1.1",
) -> bytes:
    lines = [
        "request=smtpd_access_policy",
        f"protocol_state={state}",
        "protocol_name=ESMTP",
        f"client_address={client}",
        "client_name=unknown",
        f"recipient={recipient}",
        f"instance={instance}",
        f"sasl_username={sasl}",
        "size=0",
    ]
    if sender is not None:
        lines.append(f"sender={sender}")
    return "".join(f"{line}\n" for line in lines).encode() + b"\n"


class Endpoint:
    def __init__(
        self,
        directory: Path,
        store_class: type[FlakyStore] = FlakyStore,
        *,
        accounting: Accounting = Accounting.RECIPIENTS,
        relay: dict[str, Any] | None = None,
        pop_first_relayed: Callable[[str], None] | None = None,
        **limits: float,
    ) -> None:
        self.path = directory / "policy.sock"
        clock = FakeClock()
        self.store = store_class(ttl=900, max_entries=1000, clock=clock)
        self.ledger = UsageLedger(max_users=100, clock=clock)
        self.log, self.sink = capturing_logger()
        self.metrics = Metrics()
        settings = settings_from_mapping(
            {"trusted_networks": ["10.9.0.0/16"], "local_domains": ["local.test"], **(relay or {})}
        )
        self.gate = RelayGate(
            policy=settings.relay.policy(LocalDelivery.configured(["local.test"], ["local"])),
            store=self.store,
            keying=WhitelistKeying(64),
            ledger=self.ledger,
            accounting=accounting,
            metrics=self.metrics,
            log=self.log,
            pop_first_relayed=pop_first_relayed,
        )
        self.server = PolicyServer(
            path=self.path,
            settings=PolicySettings(socket_mode=0o666, **limits),  # type: ignore[arg-type]
            gate=self.gate,
            replies=Replies("Use SMTP AUTH.", "POP-before-SMTP is retired."),
            metrics=self.metrics,
            log=self.log,
            blocking_calls=self.store.may_block,
        )

    def grant(self, address: str, user: str = "alice") -> None:
        self.store.grant(WhitelistKeying(64).key_address(parse_client_address(address)), user)

    def connect(self) -> Connection:
        return Connection(self.path)

    def ask(self, raw: bytes) -> bytes:
        with self.connect() as connection:
            return connection.ask(raw)


class Connection(PersistentClient):
    """A persistent policy client, as each smtpd process keeps one."""

    def frame(self, payload: bytes) -> bytes:
        return payload

    def split_reply(self, buffer: bytes) -> tuple[bytes, bytes] | None:
        reply, end, rest = buffer.partition(b"\n\n")
        return (reply + end, rest) if end else None


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[Endpoint]:
    with serving(Endpoint(tmp_path, timeout=0.5)) as server:
        yield server


def test_a_stranger_is_denied_with_the_milters_text(endpoint: Endpoint) -> None:
    assert endpoint.ask(request()) == DENIED


def test_a_whitelisted_client_relays_by_ok(endpoint: Endpoint) -> None:
    endpoint.grant("192.0.2.7")
    assert endpoint.ask(request()) == PERMIT
    # Normalised as the milter does it: the IPv4-mapped form is the same client.
    assert endpoint.ask(request("::ffff:192.0.2.7", instance="2.1")) == PERMIT


def test_smtp_auth_and_trusted_networks_relay(endpoint: Endpoint) -> None:
    assert endpoint.ask(request(sasl="bob")) == PERMIT
    assert endpoint.ask(request("10.9.1.1")) == PERMIT


def test_a_client_of_no_known_address_is_a_stranger(endpoint: Endpoint) -> None:
    assert endpoint.ask(request("unknown")) == DENIED
    assert endpoint.ask(request("unknown", sasl="bob", instance="2.1")) == PERMIT


def test_pop_first_retired_gets_its_own_text(tmp_path: Path) -> None:
    with serving(Endpoint(tmp_path, relay={"pop_first": "off"})) as retired:
        retired.grant("192.0.2.7")
        assert retired.ask(request()) == (
            b"action=550 5.7.1 Relaying denied. POP-before-SMTP is retired.\n\n"
        )


def test_pop_first_sender_own_binds_each_sender_to_the_entrys_users(tmp_path: Path) -> None:
    with serving(Endpoint(tmp_path, relay={"pop_first_sender": "own"})) as own:
        own.grant("192.0.2.7", "alice")
        own.grant("192.0.2.7", "bob")
        with own.connect() as connection:
            assert connection.ask(request(sender="alice@local.test", instance="1")) == PERMIT
            assert connection.ask(request(sender="bob@local.test", instance="2")) == PERMIT
            assert connection.ask(request(sender="mallory@local.test", instance="3")) == (
                b"action=550 5.7.1 Sender address is not yours: check your mail (POP/IMAP)"
                b" with the account that owns it, or turn on SMTP AUTH.\n\n"
            )
            assert connection.ask(request(sender="", instance="4")) == (
                b"action=550 5.7.1 A null sender (<>) may not relay by a POP/IMAP login:"
                b" turn on SMTP AUTH.\n\n"
            )
            # A request without any sender attribute is no one's either.
            assert connection.ask(request(sender=None, instance="5")).startswith(
                b"action=550 5.7.1 Sender address is not yours"
            )


def test_pop_first_sender_warn_relays_and_logs(tmp_path: Path) -> None:
    with serving(Endpoint(tmp_path, relay={"pop_first_sender": "warn"})) as warn:
        warn.grant("192.0.2.7", "alice")
        assert warn.ask(request(sender="mallory@local.test")) == PERMIT
        assert "sender_not_owned" in events(warn.sink)


def test_the_sender_of_one_message_is_not_reused_for_another(endpoint: Endpoint) -> None:
    with endpoint.connect() as connection:
        assert connection.ask(request(sasl="bob", instance="1")) == PERMIT
        # The same instance with another SASL user or client is another message.
        assert connection.ask(request(instance="1")) == DENIED
        assert connection.ask(request("10.9.1.1", instance="1")) == PERMIT


@pytest.mark.parametrize("store_class", [FlakyStore, BlockingStore])
def test_store_unavailable_is_a_tempfail_never_a_permit(
    tmp_path: Path, store_class: type[FlakyStore]
) -> None:
    with serving(Endpoint(tmp_path, store_class=store_class)) as flaky:
        flaky.grant("192.0.2.7")
        with flaky.connect() as connection:
            assert connection.ask(request(instance="1")) == PERMIT
            flaky.store.down = True
            assert connection.ask(request(instance="2")) == UNAVAILABLE
            assert connection.ask(request(sasl="bob", instance="3")) == PERMIT
            flaky.store.down = False
            assert connection.ask(request(instance="4")) == PERMIT
        assert "whitelist_unavailable" in events(flaky.sink)


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage\n\n",
        b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=x@remote.example\n\n",
        request().replace(b"size=0", b"client_address=10.9.1.1"),
        request().replace(b"size=0", b"sasl_username=a\x01b"),
        request(recipient=""),
        request(state="END-OF-MESSAGE"),
        request(state="DATA"),
        b"\n",
    ],
)
def test_what_cannot_be_judged_is_a_tempfail_and_the_connection_goes_on(
    endpoint: Endpoint, raw: bytes
) -> None:
    endpoint.grant("192.0.2.7")
    with endpoint.connect() as connection:
        assert connection.ask(raw) == FAILED
        assert connection.ask(request(instance="9")) == PERMIT
    assert "policy_rejected" in events(endpoint.sink)


@pytest.mark.parametrize(
    "extra", [b"x_attribute_of_a_newer_postfix=1", b"helo_name=a\x01b", b"size=1"]
)
def test_attributes_the_door_does_not_read_change_nothing(endpoint: Endpoint, extra: bytes) -> None:
    """A newer Postfix's attribute, an odd byte or a repeat in one the door skips."""
    with endpoint.connect() as connection:
        assert (
            connection.ask(request(instance="1").replace(b"size=0", b"size=0\n" + extra)) == DENIED
        )
        endpoint.grant("192.0.2.7")
        assert (
            connection.ask(request(instance="2").replace(b"size=0", b"size=0\n" + extra)) == PERMIT
        )


def test_a_request_too_long_is_refused_and_closed_and_others_are_served(
    endpoint: Endpoint,
) -> None:
    with endpoint.connect() as connection:
        connection.send(b"helo_name=" + b"x" * codec.MAX_REQUEST)
        assert connection.reply() == FAILED
        assert connection.closed()
    assert endpoint.ask(request()) == DENIED
    assert "policy_rejected" in events(endpoint.sink)


def test_a_request_that_stalls_times_out_with_a_tempfail(endpoint: Endpoint) -> None:
    with endpoint.connect() as connection:
        connection.send(b"request=smtpd_access_policy\n")
        assert endpoint.ask(request()) == DENIED  # others are served meanwhile
        assert connection.reply() == FAILED
        assert connection.closed()
    assert "policy_timeout" in events(endpoint.sink)


def test_a_client_that_hangs_up_mid_request_changes_nothing(endpoint: Endpoint) -> None:
    for _ in range(3):
        with endpoint.connect() as connection:
            connection.send(request()[:40])
        with endpoint.connect():
            pass  # and one that says nothing at all
    assert endpoint.ask(request()) == DENIED


def test_an_unexpected_failure_is_a_tempfail_logged_with_its_traceback(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("bug")

    with endpoint.connect() as connection:
        monkeypatch.setattr(endpoint.gate, "message", broken)
        assert connection.ask(request(sasl="bob")) == FAILED
        monkeypatch.undo()
        assert connection.ask(request(sasl="bob", instance="2")) == PERMIT
    failed = [c for c in endpoint.sink.calls if c.kwargs.get("event") == "request_failed"]
    assert failed and failed[0].kwargs["exc_info"] is True


def test_pipelined_requests_get_one_reply_each_in_order(endpoint: Endpoint) -> None:
    endpoint.grant("192.0.2.7")
    with endpoint.connect() as connection:
        connection.send(request() + b"bad\n\n" + request("192.0.2.8") + request(sasl="bob"))
        assert [connection.reply() for _ in range(4)] == [PERMIT, FAILED, DENIED, PERMIT]


@pytest.mark.parametrize("store_class", [FlakyStore, BlockingStore])
def test_many_concurrent_persistent_clients(tmp_path: Path, store_class: type[FlakyStore]) -> None:
    failures: list[str] = []
    start = threading.Barrier(32)
    with serving(Endpoint(tmp_path, store_class=store_class)) as busy:
        for n in range(0, 32, 2):
            busy.grant(f"10.0.0.{n}")

        def client(n: int) -> None:
            with busy.connect() as connection:
                start.wait()
                for message in range(30):
                    want = PERMIT if n % 2 == 0 else DENIED
                    reply = connection.ask(request(f"10.0.0.{n}", instance=f"{n}.{message}"))
                    if reply != want:
                        failures.append(f"{n}: {reply!r}")

        threads = [threading.Thread(target=client, args=(n,)) for n in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


def test_too_many_clients_get_a_tempfail(tmp_path: Path) -> None:
    with serving(Endpoint(tmp_path, max_clients=2)) as capped:
        held = [capped.connect(), capped.connect()]
        for connection in held:  # both served, and both in the middle of a request
            connection.send(request(sasl="bob") + b"request=smtpd")
            assert connection.reply() == PERMIT
        with capped.connect() as third:
            assert third.ask(request(sasl="bob")) == FAILED
            assert third.closed()
        for connection in held:
            connection.socket.close()
    assert "policy_busy" in events(capped.sink)


def relayed(ledger: UsageLedger, user: str) -> tuple[int, int]:
    usage = ledger.get(user)
    assert usage is not None
    return usage.pop_messages, usage.pop_recipients


def test_relayed_recipients_are_counted_when_accepted(tmp_path: Path) -> None:
    with serving(Endpoint(tmp_path, accounting=Accounting.RECIPIENTS)) as counting:
        counting.grant("192.0.2.7")
        with counting.connect() as connection:
            for recipient in (REMOTE, "other@remote.example"):
                assert connection.ask(request(recipient=recipient, instance="1")) == PERMIT
            assert relayed(counting.ledger, "alice") == (1, 2)
            assert connection.ask(request(instance="2")) == PERMIT
        assert relayed(counting.ledger, "alice") == (2, 3)


def test_messages_are_counted_once_each(tmp_path: Path) -> None:
    with serving(Endpoint(tmp_path, accounting=Accounting.MESSAGES)) as counting:
        counting.grant("192.0.2.7")
        with counting.connect() as connection:
            for recipient in (REMOTE, "other@remote.example"):
                assert connection.ask(request(recipient=recipient, instance="1")) == PERMIT
        assert relayed(counting.ledger, "alice") == (1, 0)


def test_stop_ends_persistent_connections_and_removes_the_socket(tmp_path: Path) -> None:
    server = Endpoint(tmp_path)
    server.server.start()
    connection = server.connect()
    assert connection.ask(request()) == DENIED
    server.server.stop()
    assert connection.closed()
    assert not server.path.exists()
    assert "policy_stopped" in events(server.sink)


def decisions(sink: CapturingLogger) -> list[dict[str, Any]]:
    return [c.kwargs for c in sink.calls if c.kwargs.get("event") == "relay_decision"]


def test_each_decision_is_logged_by_the_gate(endpoint: Endpoint) -> None:
    endpoint.ask(request())
    assert decisions(endpoint.sink)[-1]["reason"] == "relay_denied"
    assert decisions(endpoint.sink)[-1]["recipient"] == REMOTE
    assert decisions(endpoint.sink)[-1]["door"] == "policy"


def test_only_a_relay_permission_is_ok_a_local_accept_is_dunno(endpoint: Endpoint) -> None:
    from popauth.relay.decision import ACCEPT_LOCAL, ACCEPT_WHITELISTED, REJECT_RELAY

    assert endpoint.server.reply_to(ACCEPT_WHITELISTED) == PERMIT
    assert endpoint.server.reply_to(ACCEPT_LOCAL) == b"action=DUNNO\n\n"
    assert endpoint.server.reply_to(REJECT_RELAY) == DENIED


def test_a_pop_first_relay_offers_its_user_a_notice_once_per_message(tmp_path: Path) -> None:
    offered: list[str] = []
    with serving(Endpoint(tmp_path, pop_first_relayed=offered.append)) as noticing:
        noticing.grant("192.0.2.7")
        with noticing.connect() as connection:
            for recipient in (REMOTE, "other@remote.example"):
                assert connection.ask(request(recipient=recipient, instance="1")) == PERMIT
            assert connection.ask(request(sasl="bob", instance="2")) == PERMIT
        assert offered == ["alice"]
