"""The phase-out of POP-before-SMTP: retirement date, exempt users, graduation.

The pure decision's properties are in tests/properties/test_decision.py;
here the gate, the graduates' store, the settings, the ingest verbs and
the dry run of ``popauth report --retire-at``.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import CapturingLogger

from popauth.basics.addresses import WhitelistKeying, parse_client_address
from popauth.basics.clock import how_long, rfc3339, utc_text
from popauth.basics.errors import ConfigError, StateFileError
from popauth.cli import main
from popauth.config import settings_from_mapping
from popauth.daemon.serve import socketmap_server
from popauth.doors.ingest.report import Standing, dry_run, report_rows
from popauth.doors.socketmap import codec
from popauth.localdelivery import LocalDelivery
from popauth.relay.accounting import Accounting
from popauth.relay.decision import Campaign, Reason, Verdict
from popauth.relay.explain import Explainer, Question
from popauth.relay.gate import RelayGate
from popauth.relay.recipients import Recipient
from popauth.relay.replies import Replies
from popauth.store import StoreUnavailable
from popauth.store.accounts import (
    FileGraduates,
    Graduates,
    GraduatesUnwritable,
    Graduation,
    RelayWay,
    UsageLedger,
)
from popauth.store.memory import MemoryStore
from popauth.telemetry.metrics import Metrics
from tests.support.clock import FakeClock
from tests.support.ingest_endpoint import Endpoint
from tests.support.logs import capturing_logger, events

CLIENT = parse_client_address("198.51.100.7")
NEIGHBOUR = parse_client_address("198.51.100.8")
REMOTE = Recipient("<x@remote.example>", "smtp", "x@remote.example")
LOCAL = Recipient("<y@local.test>", "local", "y@local.test")
START = 1_800_000_000.0


class Books:
    def __init__(self, graduates: Graduates, **settings: Any) -> None:
        relay = settings_from_mapping(
            {"trusted_networks": [], "local_domains": ["local.test"], **settings}
        ).relay
        self.clock = FakeClock(START)
        self.store = MemoryStore(ttl=900, max_entries=10, clock=self.clock)
        self.ledger = UsageLedger(max_users=10, clock=self.clock)
        self.log, self.sink = capturing_logger()
        self.graduates = graduates
        # The users the gate offered a notice (pop_first_relayed).
        self.offered: list[str] = []
        self.replies = Replies(
            relay.reject_message,
            relay.pop_first_retired_message,
            pop_first_graduated=relay.pop_first_graduated_message,
        )
        self.gate = RelayGate(
            policy=relay.policy(LocalDelivery.configured(["local.test"], ["local"])),
            store=self.store,
            keying=WhitelistKeying(),
            ledger=self.ledger,
            accounting=Accounting.MESSAGES,
            metrics=Metrics(),
            log=self.log,
            graduates=graduates,
            clock=self.clock,
            pop_first_relayed=self.offered.append,
        )

    def verdict(self, address: Any = CLIENT, auth: str = "", sender: str | None = None) -> Any:
        decision, message = self.gate.message(address, auth, sender)
        return decision or self.gate.recipient(message, REMOTE)


def _books(tmp_path: Path, **settings: Any) -> Books:
    return Books(FileGraduates(tmp_path / "graduates.json"), **settings)


def _sink_events(sink: CapturingLogger, name: str) -> list[dict[str, Any]]:
    """The fields of each ``name`` event the sink caught."""
    return [
        call.kwargs for call, event in zip(sink.calls, events(sink), strict=True) if event == name
    ]


# --- the retirement date ----------------------------------------------------


def test_pop_first_relays_until_the_date_and_is_refused_from_it_on(tmp_path: Path) -> None:
    books = _books(tmp_path, pop_first_retire_at=rfc3339(START + 60))
    books.store.grant(CLIENT, "alice")
    assert books.verdict().reason is Reason.WHITELISTED
    (deprecated,) = _sink_events(books.sink, "pop_first_deprecated")
    assert deprecated["retire_at"] == "2027-01-15T08:01:00Z"
    books.clock.advance(59)
    assert books.verdict().reason is Reason.WHITELISTED
    books.clock.advance(1)
    refused = books.verdict()
    assert (refused.verdict, refused.reason) == (Verdict.REJECT, Reason.POP_FIRST_RETIRED)
    assert "turn on SMTP AUTH" in str(books.replies.refusal(refused))
    # A local recipient is still accepted, SMTP AUTH still relays.
    _, message = books.gate.message(CLIENT, "")
    assert books.gate.recipient(message, LOCAL).reason is Reason.LOCAL_RECIPIENT
    assert books.verdict(auth="alice").reason is Reason.SMTP_AUTH


def test_an_exempt_user_keeps_pop_first_and_is_still_counted(tmp_path: Path) -> None:
    books = _books(
        tmp_path, pop_first_retire_at=rfc3339(START - 1), pop_first_exempt_users=["alice"]
    )
    books.store.grant(CLIENT, "alice")
    books.store.grant(NEIGHBOUR, "bob")
    assert books.verdict(CLIENT).reason is Reason.WHITELISTED
    assert books.verdict(NEIGHBOUR).reason is Reason.POP_FIRST_RETIRED
    usage = books.ledger.get("alice")
    assert usage is not None and usage.pop_messages == 1
    # Exact names: another spelling is another account.
    books.store.revoke(CLIENT)
    books.store.grant(CLIENT, "Alice")
    assert books.verdict(CLIENT).reason is Reason.POP_FIRST_RETIRED


def test_own_lets_only_the_exempt_users_own_senders_keep_pop_first(tmp_path: Path) -> None:
    books = _books(
        tmp_path,
        pop_first_retire_at=rfc3339(START - 1),
        pop_first_exempt_users=["alice"],
        pop_first_sender="own",
    )
    # Alice and a stranger (bob) behind one NAT address.
    books.store.grant(CLIENT, "alice")
    books.store.grant(CLIENT, "bob")
    assert books.verdict(sender="alice@local.test").reason is Reason.WHITELISTED
    assert books.verdict(sender="bob@local.test").reason is Reason.POP_FIRST_RETIRED
    assert books.verdict(sender="mallory@local.test").reason is Reason.SENDER_NOT_OWNED


def test_retire_at_with_pop_first_off_is_refused() -> None:
    with pytest.raises(ConfigError, match="already retired"):
        settings_from_mapping({"pop_first": "off", "pop_first_retire_at": "2027-03-01"})
    with pytest.raises(ConfigError, match="exemptions need"):
        settings_from_mapping({"pop_first": "off", "pop_first_exempt_users": ["alice"]})


@pytest.mark.parametrize(
    ("written", "epoch"),
    [
        ("2027-03-01T00:00:00Z", 1803859200.0),
        ("2027-03-01T01:00:00+01:00", 1803859200.0),
        ("2027-03-01", 1803859200.0),
    ],
)
def test_retire_at_reads_rfc_3339_and_dates(written: str, epoch: float) -> None:
    settings = settings_from_mapping({"pop_first": "warn", "pop_first_retire_at": written})
    assert settings.relay.campaign().retire_at == epoch


@pytest.mark.parametrize("written", ["2027-03-01T00:00:00", "March 1st", "2027-13-01", 5])
def test_retire_at_refuses_a_time_without_offset_or_garbage(written: object) -> None:
    with pytest.raises(ConfigError, match="pop_first_retire_at"):
        settings_from_mapping({"pop_first_retire_at": written})


def test_the_exempt_users_file_has_comments_and_stops_popauth_when_bad(tmp_path: Path) -> None:
    listed = tmp_path / "exempt"
    listed.write_text("# the board\nalice\n\n  carol   # until March\n")
    settings = settings_from_mapping(
        {"pop_first_exempt_users": ["bob"], "pop_first_exempt_users_file": str(listed)}
    )
    assert settings.relay.campaign().exempt_users == {"alice", "bob", "carol"}
    listed.write_text("alice\ncarol dave\n")
    with pytest.raises(ConfigError, match="line 2"):
        settings_from_mapping({"pop_first_exempt_users_file": str(listed)})


def test_how_long_says_days_hours_and_ago() -> None:
    assert how_long(3 * 86_400 + 4 * 3_600 + 5) == "in 3 days 4 h"
    assert how_long(-(2 * 3_600 + 5 * 60)) == "2 h 5 min ago"
    assert how_long(86_400) == "in 1 day"
    assert how_long(0) == "now"


def test_utc_text_is_a_moment_in_utc_to_the_second() -> None:
    assert utc_text(1_800_000_000.4) == "2027-01-15 08:00:00 UTC"
    assert utc_text(0) == "1970-01-01 00:00:00 UTC"


# --- graduation ---------------------------------------------------------------


def test_an_smtp_auth_relay_graduates_the_user_and_ends_their_pop_first(tmp_path: Path) -> None:
    books = _books(tmp_path, pop_first_graduate=True)
    books.store.grant(CLIENT, "alice")
    assert books.verdict().reason is Reason.WHITELISTED
    assert books.verdict(NEIGHBOUR, auth="ALICE").reason is Reason.SMTP_AUTH
    (graduated,) = _sink_events(books.sink, "pop_first_graduated")
    assert graduated["user"] == "ALICE"
    refused = books.verdict()
    assert (refused.verdict, refused.reason) == (Verdict.REJECT, Reason.POP_FIRST_GRADUATED)
    assert "already uses SMTP AUTH" in str(books.replies.refusal(refused))
    # Written through: a restart keeps it.
    assert FileGraduates(tmp_path / "graduates.json").graduated_among(("alice",)) == {"alice"}
    # A second AUTH relay writes nothing more.
    books.verdict(NEIGHBOUR, auth="alice")
    assert len(_sink_events(books.sink, "pop_first_graduated")) == 1


def test_a_stranger_behind_a_graduates_address_gains_nothing(tmp_path: Path) -> None:
    books = _books(tmp_path, pop_first_graduate=True, pop_first_sender="own")
    books.verdict(NEIGHBOUR, auth="alice")
    books.store.grant(CLIENT, "alice")
    books.store.grant(CLIENT, "bob")
    assert books.verdict(sender="alice@local.test").reason is Reason.POP_FIRST_GRADUATED
    assert books.verdict(sender="bob@local.test").reason is Reason.WHITELISTED


def test_without_pop_first_graduate_nobody_graduates(tmp_path: Path) -> None:
    books = _books(tmp_path)
    books.verdict(NEIGHBOUR, auth="alice")
    assert books.graduates.records() == {}


def test_a_reinstated_user_relays_by_pop_first_and_does_not_graduate_again(
    tmp_path: Path,
) -> None:
    books = _books(tmp_path, pop_first_graduate=True)
    books.store.grant(CLIENT, "alice")
    books.verdict(NEIGHBOUR, auth="alice")
    assert books.graduates.reinstate("Alice", START + 5) == Graduation(START)
    assert books.graduates.reinstate("alice", START + 6) is None
    assert books.verdict().reason is Reason.WHITELISTED
    books.verdict(NEIGHBOUR, auth="alice")
    assert books.verdict().reason is Reason.WHITELISTED
    assert books.graduates.records() == {"alice": Graduation(START, START + 5)}


class Unwritable(FileGraduates):
    def graduate(self, user: str, now: float) -> bool:
        raise GraduatesUnwritable("graduates not saved: read-only")

    def graduated_among(self, users: tuple[str, ...]) -> frozenset[str]:
        raise StoreUnavailable("redis: down")


def test_unknown_graduations_fail_closed(tmp_path: Path) -> None:
    books = Books(Unwritable(None), pop_first_graduate=True)
    books.store.grant(CLIENT, "alice")
    assert books.verdict().verdict is Verdict.TEMPFAIL
    assert _sink_events(books.sink, "graduates_unavailable")
    assert books.verdict(NEIGHBOUR, auth="alice").reason is Reason.SMTP_AUTH
    assert _sink_events(books.sink, "graduation_not_saved")


def test_a_graduation_that_cannot_be_written_changes_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    graduates = FileGraduates(directory / "graduates.json")
    # Its directory replaced by a plain file: no write can succeed, not even root's.
    directory.rmdir()
    directory.write_text("")
    with pytest.raises(GraduatesUnwritable):
        graduates.graduate("alice", START)
    assert graduates.records() == {}


def test_a_graduates_file_with_a_bad_record_drops_it_and_a_bad_file_stops(
    tmp_path: Path,
) -> None:
    path = tmp_path / "graduates.json"
    users = {
        "alice": {"graduated_at": START, "reinstated_at": 0},
        "bob": {"graduated_at": "yesterday", "reinstated_at": 0},
        "carol dave": {"graduated_at": START, "reinstated_at": 0},
    }
    path.write_text(json.dumps({"format": "popauth-graduates", "version": 1, "users": users}))
    log, sink = capturing_logger()
    assert FileGraduates(path, log).records() == {"alice": Graduation(START)}
    assert len(_sink_events(sink, "graduate_record_dropped")) == 2
    path.write_text("{")
    with pytest.raises(StateFileError):
        FileGraduates(path)


# --- the ingest verbs and the report -----------------------------------------


def test_reinstate_over_the_socket(tmp_path: Path) -> None:
    endpoint = Endpoint(tmp_path)
    endpoint.server.start()
    try:
        assert endpoint.ask("REINSTATE alice") == ["NOTFOUND user=alice"]
        endpoint.graduates.graduate("alice", START)
        assert endpoint.ask("REINSTATE alice") == [f"OK user=alice graduated={int(START)}"]
        assert FileGraduates(tmp_path / "graduates.json").graduated_among(("alice",)) == set()
        assert endpoint.ask("REINSTATE alice") == ["NOTFOUND user=alice"]
        assert endpoint.ask("REINSTATE").pop().startswith("ERR syntax usage: REINSTATE user")
    finally:
        endpoint.server.stop()
    assert [e["found"] for e in _sink_events(endpoint.sink, "pop_first_reinstated")] == [
        False,
        True,
        False,
    ]


def test_report_shows_graduations_and_exemptions(tmp_path: Path) -> None:
    endpoint = Endpoint(tmp_path, campaign=Campaign(exempt_users=frozenset({"carol"})))
    endpoint.ledger.record("alice", RelayWay.POP_FIRST, messages=2, recipients=0)
    endpoint.ledger.record("carol", RelayWay.POP_FIRST, messages=1, recipients=0)
    endpoint.graduates.graduate("alice", START)
    endpoint.graduates.graduate("dave", START + 1)
    endpoint.server.start()
    try:
        reply = endpoint.ask("REPORT")
    finally:
        endpoint.server.stop()
    rows = {row["user"]: row for row in report_rows(reply[1:])}
    assert reply[0] == "OK count=3"
    assert (rows["alice"]["graduated"], rows["alice"]["exempt"]) == (str(int(START)), "no")
    assert (rows["carol"]["graduated"], rows["carol"]["exempt"]) == ("0", "yes")
    assert rows["dave"]["pop_messages"] == "0"


def _row(user: str, pop: int, pop_last: float, auth_last: float = 0, **more: str) -> str:
    fields = {
        "user": user,
        "pop_messages": str(pop),
        "pop_last_seen": str(int(pop_last)),
        "auth_last_seen": str(int(auth_last)),
        "graduated": "0",
        "reinstated": "0",
        "exempt": "no",
        **more,
    }
    return " ".join(f"{key}={value}" for key, value in fields.items())


def test_the_dry_run_sorts_recent_pop_first_users_by_standing() -> None:
    now = START
    lines = [
        _row("alice", 30, now - 3_600),
        _row("bob", 10, now - 86_400, auth_last=now - 60),
        _row("carol", 5, now - 7_200, exempt="yes"),
        _row("dave", 5, now - 40 * 86_400),
        _row("erin", 15, now - 100, auth_last=now - 200),
        _row("frank", 40, now - 300, auth_last=now - 100, graduated=str(int(now - 100))),
    ]
    run = dry_run(report_rows(lines), now + 86_400, now, 30)
    names = {which: [row["user"] for row in rows] for which, rows in run.groups.items()}
    assert names == {
        Standing.REFUSED: ["alice", "erin"],
        Standing.EXEMPT: ["carol"],
        Standing.GRADUATED: ["frank"],
        Standing.SWITCHED: ["bob"],
    }
    assert (run.messages(Standing.REFUSED), run.messages()) == (45, 100)
    assert run.refused_share == 0.45


def test_popauth_report_retire_at_prints_the_dry_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = Endpoint(tmp_path, campaign=Campaign(exempt_users=frozenset({"carol"})))
    endpoint.ledger.record("alice", RelayWay.POP_FIRST, messages=3, recipients=0)
    endpoint.ledger.record("carol", RelayWay.POP_FIRST, messages=1, recipients=0)
    endpoint.server.start()
    try:
        # The ledger's FakeClock stands in the past: look back far enough.
        status = main(
            [
                "report",
                "--socket",
                str(endpoint.path),
                "--retire-at",
                "2030-01-01",
                "--days",
                "3660",
            ]
        )
    finally:
        endpoint.server.stop()
    out = capsys.readouterr().out
    assert status == 0
    assert "dry run: POP first retired at 2030-01-01T00:00:00Z (in " in out
    assert "would be refused: 1 users, 3 of 4 POP-first messages (75.0%)" in out
    refused = out.split("would be refused (")[1].split("not affected: exempt")[0]
    assert "alice" in refused and "carol" not in refused
    assert "not affected: exempt (pop_first_exempt_users): 1\nuser" in out


def _socketmap_answers(server: Any, path: Path, *addresses: str) -> list[bytes]:
    server.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(str(path))
            answers = []
            for address in addresses:
                client.sendall(codec.encode(f"popauth {address}".encode()))
                answers.append(client.recv(200))
            return answers
    finally:
        server.stop()


def test_the_socketmap_answers_notfound_for_what_pop_first_no_longer_relays(
    tmp_path: Path,
) -> None:
    books = _books(
        tmp_path,
        pop_first_retire_at=rfc3339(START + 60),
        pop_first_exempt_users=["bob"],
        pop_first_graduate=True,
        pop_first_sender="own",
    )
    books.store.grant(CLIENT, "alice")
    books.store.grant(NEIGHBOUR, "bob")
    books.store.grant(parse_client_address("198.51.100.9"), "carol")
    books.verdict(parse_client_address("203.0.113.1"), auth="carol")  # carol graduates
    path = tmp_path / "s.sock"
    settings = settings_from_mapping({"socketmap_socket": str(path)})
    server = socketmap_server(
        settings, books.store, WhitelistKeying(), Metrics(), books.log, gate=books.gate
    )
    addresses = ("198.51.100.7", "198.51.100.8", "198.51.100.9")
    ok, notfound = codec.encode(b"OK OK"), codec.encode(b"NOTFOUND ")
    assert _socketmap_answers(server, path, *addresses) == [ok, ok, notfound]
    books.clock.advance(60)
    server = socketmap_server(
        settings, books.store, WhitelistKeying(), Metrics(), books.log, gate=books.gate
    )
    assert _socketmap_answers(server, path, *addresses) == [notfound, ok, notfound]


def test_explain_says_the_date_the_exempt_and_the_graduated(tmp_path: Path) -> None:
    books = _books(
        tmp_path,
        pop_first_retire_at=rfc3339(START + 3 * 86_400),
        pop_first_exempt_users=["bob"],
        pop_first_graduate=True,
    )
    books.store.grant(CLIENT, "alice")
    books.store.grant(CLIENT, "bob")
    books.verdict(NEIGHBOUR, auth="alice")
    explainer = Explainer(
        gate=books.gate,
        store=books.store,
        keying=WhitelistKeying(),
        blocked=frozenset(),
        replies=books.replies,
        clock=books.clock,
    )
    lines = explainer.explain(Question(CLIENT, "x@remote.example"))
    assert lines[0].startswith("verdict: accept (whitelisted)")
    assert "pop_first_retire_at: retires at 2027-01-18 08:00:00 UTC (in 3 days)" in lines[-3]
    assert lines[-2].startswith("exempt: bob keep POP-first after the date")
    assert lines[-1].startswith("graduated: alice has relayed by SMTP AUTH")
    assert "popauth pop-first reinstate alice" in lines[-1]
    books.clock.advance(3 * 86_400 + 7_200)
    books.store.revoke(CLIENT)
    books.store.grant(CLIENT, "carol")
    lines = explainer.explain(Question(CLIENT, "x@remote.example"))
    assert lines[0].startswith("verdict: reject (pop_first_retired)")
    assert "pop_first_retire_at has passed: a POP/IMAP login lets only exempt" in lines[2]
    assert "retired at 2027-01-18 08:00:00 UTC (2 h ago)" in lines[-1]


def test_check_config_shows_the_date_and_how_long_is_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "popauth.toml"
    config.write_text(
        'pop_first = "warn"\npop_first_retire_at = 2000-01-01T00:00:00Z\n'
        'pop_first_exempt_users = ["bob"]\nlocal_domains = ["local.test"]\n'
        'local_mailers = ["local"]\n'
    )
    assert main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "pop_first_retire_at: retired at 2000-01-01 00:00:00 UTC (" in out
    assert " days " in out and "ago): POP-first relays only for exempt users" in out
    assert "pop_first_exempt_users: 1 users exempt" in out
    assert main(["check-config", "--show", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert 'pop_first_retire_at = "2000-01-01T00:00:00+00:00"  # changed; default: ""' in out
    assert "# pop_first_retire_at: retired at 2000-01-01 00:00:00 UTC (" in out


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        (["--retire-at", "next tuesday"], "must be an RFC 3339 time"),
        (["--retire-at", "2027-03-01T00:00"], "give its offset from UTC"),
        (["--retire-at", "2027-03-01", "--days", "0"], "1 to 3660 days"),
    ],
)
def test_report_retire_at_refuses_bad_arguments(
    arguments: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["report", "--socket", "/nonexistent", *arguments])
    assert stopped.value.code == 2
    assert complaint in capsys.readouterr().err
