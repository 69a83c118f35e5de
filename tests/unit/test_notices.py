"""Notices to POP-first users: the template, the schedule, the ledgers and the worker."""

from __future__ import annotations

import email
import email.policy
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import CapturingLogger

from popauth.basics.addresses import WhitelistKeying, parse_client_address
from popauth.basics.errors import ConfigError, StateFileError
from popauth.config import settings_from_mapping
from popauth.daemon.notices import first_local_domain, notice_schedule
from popauth.localdelivery import LocalDelivery
from popauth.notices.ledger import (
    FileNoticeLedger,
    LedgerUnavailable,
    NoticeLedger,
    RedisNoticeLedger,
    Sent,
)
from popauth.notices.mail import NoticeMail, Sendmail, SubmissionFailed, notice_address
from popauth.notices.schedule import DAY, FINAL_WEEK, NoticeSchedule
from popauth.notices.template import (
    DEFAULT_TEMPLATE,
    TemplateError,
    parse_template,
    read_template,
)
from popauth.notices.worker import NoticeOptions, NoticeWorker
from popauth.relay.accounting import Accounting
from popauth.relay.gate import RelayGate
from popauth.store.accounts import UsageLedger
from popauth.store.memory import MemoryStore
from popauth.telemetry.metrics import Metrics
from tests.support.clock import FakeClock
from tests.support.logs import capturing_logger, events

REPO = Path(__file__).resolve().parents[2]
WEEK = 7 * DAY
NOW = 1_800_000_000.0
SENDER = "postmaster@local.test"


# -- the template ------------------------------------------------------------


def test_the_contrib_template_is_the_built_in_one() -> None:
    assert (REPO / "contrib" / "pop-first-notice.txt").read_text() == DEFAULT_TEMPLATE


def test_the_placeholders_are_filled_in() -> None:
    template = parse_template(
        "Subject: for {user} by {date}\n\n{days_left} {smtp_auth_instructions} {{x}}\n"
    )
    values = {
        "user": "joe",
        "date": "2027-03-01",
        "days_left": "3",
        "smtp_auth_instructions": "AUTH!",
    }
    assert template.render(values) == ("for joe by 2027-03-01", "3 AUTH! {x}\n")


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("Subject: hi\n\nHello {usr}\n", "unknown placeholder {usr}; known: {user}, {date}"),
        ("Subject: {name}\n\nbody\n", "unknown placeholder {name}"),
        ("Subject: hi\n\n{user.upper}\n", "unknown placeholder {user.upper}"),
        ("Subject: hi\n\n{0}\n", "unknown placeholder {0}"),
        ("Subject: hi\n\n{user!r}\n", "placeholder {user} takes no conversion or format"),
        ("Subject: hi\n\n{days_left:>5}\n", "takes no conversion or format"),
        ("Subject: hi\n\nan { alone\n", "a literal brace is written twice"),
        ("Subject: hi\nbody, no blank line\n\nmore\n", "is not one of Subject:"),
        ("Hello {user}\n", "no blank line"),
        ("From: me@example.org\n\nbody\n", "header line 'From: me@example.org' is not one of"),
        ("Subject:   \n\nbody\n", "the Subject: header is empty"),
    ],
)
def test_a_bad_template_says_why_in_one_line(text: str, said: str) -> None:
    with pytest.raises(TemplateError) as raised:
        parse_template(text)
    assert said in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_bad_template_file_is_a_configuration_error_at_load(tmp_path: Path) -> None:
    path = tmp_path / "notice.txt"
    path.write_text("Subject: hi\n\nHello {username}\n")
    with pytest.raises(ConfigError) as raised:
        settings_from_mapping({"pop_first_notice_template": str(path)})
    assert str(raised.value) == (
        "bad value for 'pop_first_notice_template': unknown placeholder {username}; "
        "known: {user}, {date}, {days_left}, {smtp_auth_instructions}"
    )
    path.write_text("Subject: hi\n\nHello {user}\n")
    settings = settings_from_mapping({"pop_first_notice_template": str(path)})
    assert read_template(settings.notices.template).body == "Hello {user}\n"
    with pytest.raises(ConfigError, match="cannot read"):
        settings_from_mapping({"pop_first_notice_template": str(tmp_path / "missing.txt")})


def test_a_line_break_in_a_value_does_not_end_the_subject() -> None:
    template = parse_template("Subject: {smtp_auth_instructions}\n\nbody\n")
    values = {"user": "", "date": "", "days_left": "", "smtp_auth_instructions": "a\nB: c"}
    assert template.render(values)[0] == "a B: c"


# -- the retirement date in the settings ---------------------------------------


@pytest.mark.parametrize(
    ("raw", "iso"),
    [
        ("2027-03-01T00:00:00Z", "2027-03-01T00:00:00+00:00"),
        ("2027-03-01T12:30:00+02:00", "2027-03-01T12:30:00+02:00"),
        ("2027-03-01", "2027-03-01T00:00:00+00:00"),
    ],
)
def test_the_retirement_date_is_rfc3339(raw: str, iso: str) -> None:
    retire_at = settings_from_mapping({"pop_first_retire_at": raw}).relay.pop_first_retire_at
    assert retire_at is not None and retire_at.isoformat() == iso


@pytest.mark.parametrize("raw", ["2027-03-01T00:00:00", "next spring", 5])
def test_a_retirement_date_without_offset_or_date_is_refused(raw: object) -> None:
    with pytest.raises(ConfigError, match="pop_first_retire_at"):
        settings_from_mapping({"pop_first_retire_at": raw})


def test_the_schedule_comes_from_the_settings() -> None:
    settings = settings_from_mapping(
        {
            "pop_first": "warn",
            "pop_first_retire_at": "2027-03-01",
            "pop_first_notice_interval": 86400,
        }
    )
    schedule = notice_schedule(settings)
    assert (schedule.interval, schedule.warn, schedule.retired) == (86400.0, True, False)
    assert schedule.date_text() == "2027-03-01"


# -- the schedule ----------------------------------------------------------------


def test_without_a_date_only_warn_sends_notices() -> None:
    assert not NoticeSchedule(WEEK).active(NOW)
    assert NoticeSchedule(WEEK, warn=True).active(NOW)
    assert not NoticeSchedule(WEEK, warn=True, retired=True).active(NOW)
    assert NoticeSchedule(WEEK).date_text() == "soon"
    assert NoticeSchedule(WEEK).days_left(NOW) is None


def test_with_a_date_notices_go_out_until_it() -> None:
    schedule = NoticeSchedule(WEEK, retire_at=NOW + 30 * DAY)
    assert schedule.active(NOW)
    assert schedule.days_left(NOW) == 30
    assert schedule.days_left(NOW + 29.5 * DAY) == 1
    assert not schedule.active(NOW + 30 * DAY)
    assert not NoticeSchedule(WEEK, retire_at=NOW + DAY, retired=True).active(NOW)


def test_at_most_once_per_interval() -> None:
    schedule = NoticeSchedule(WEEK, warn=True)
    assert schedule.is_due(NOW, None)
    due = schedule.next_due(NOW)
    assert due == NOW + WEEK
    assert not schedule.is_due(NOW + WEEK - 1, due)
    assert schedule.is_due(NOW + WEEK, due)


def test_once_more_in_the_final_week() -> None:
    retire_at = NOW + 10 * DAY
    schedule = NoticeSchedule(WEEK, retire_at=retire_at)
    # Sent 10 days before: the next is due when the final week starts, 3 days on.
    assert schedule.next_due(NOW) == retire_at - FINAL_WEEK
    # Sent in the final week: the next would come after the date, so never.
    in_final_week = retire_at - FINAL_WEEK + 1
    assert not schedule.is_due(retire_at - 1, schedule.next_due(in_final_week))
    # A long interval still gives the final week's notice.
    assert NoticeSchedule(30 * DAY, retire_at=retire_at).next_due(NOW) == retire_at - FINAL_WEEK


# -- addresses and the mail ------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "address"),
    [
        ("joe", "joe@local.test"),
        ("joe@example.org", "joe@example.org"),
        ("joe@", None),
        ("-oQ/tmp", None),
        ("jo e", None),
        ("", None),
    ],
)
def test_the_users_own_address(user: str, address: str | None) -> None:
    assert notice_address(user, "local.test") == address


def test_a_bare_login_needs_a_local_domain() -> None:
    assert notice_address("joe", None) is None


def test_the_first_local_domain_is_a_mailbox_domain() -> None:
    local = LocalDelivery.configured([".sub.local.test", "local.test", "other.test"], ["local"])
    assert first_local_domain(local) == "local.test"
    assert first_local_domain(LocalDelivery.configured([], ["local"])) is None


def test_the_mail_has_every_header_a_notice_needs() -> None:
    mail = NoticeMail(read_template(None), SENDER, "local.test")
    values = {
        "user": "jörg",
        "date": "2027-03-01",
        "days_left": "9",
        "smtp_auth_instructions": "Port 587.",
    }
    raw = mail.compose("jörg@local.test", values, NOW)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["From"] == SENDER
    assert parsed["To"] == "jörg@local.test"
    assert parsed["Subject"] == "POP before SMTP ends 2027-03-01: please turn on SMTP AUTH"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["MIME-Version"] == "1.0"
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content_charset() == "utf-8"
    assert parsed["Message-ID"].endswith("@local.test>")
    assert parsed["Date"].datetime.timestamp() == NOW
    body = parsed.get_content()
    assert "Hello jörg," in body and "(9 days" in body and "Port 587." in body
    assert b"\r\n" not in raw


# -- the ledgers -------------------------------------------------------------------------


class FakeRedis:
    """SET NX PX, MGET and DEL over a dictionary, expiring by a fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.values: dict[str, tuple[str, float]] = {}

    def _live(self, key: str) -> str | None:
        found = self.values.get(key)
        if found is None or found[1] <= self.clock.time():
            self.values.pop(key, None)
            return None
        return found[0]

    def set(self, key: str, value: str, *, nx: bool, px: int) -> bool | None:
        if nx and self._live(key) is not None:
            return None
        self.values[key] = (value, self.clock.time() + px / 1000)
        return True

    def mget(self, keys: list[str]) -> list[bytes | None]:
        return [None if (v := self._live(k)) is None else v.encode() for k in keys]

    def delete(self, key: str) -> int:
        return 1 if self.values.pop(key, None) is not None else 0


@pytest.fixture(params=["file", "redis"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[NoticeLedger, FakeClock]:
    """The file ledger or the Redis one, and the clock the fake Redis expires keys by."""
    clock = FakeClock(NOW)
    if request.param == "file":
        return FileNoticeLedger(tmp_path / "notices.json"), clock
    return RedisNoticeLedger(FakeRedis(clock), "p:"), clock  # type: ignore[arg-type]


def test_a_claim_holds_until_the_next_notice_is_due(ledger: tuple[NoticeLedger, FakeClock]) -> None:
    notices, clock = ledger
    record = Sent(NOW, NOW + WEEK)
    assert notices.claim("Alice", record, NOW)
    # Another host, or the same one: the user is told once.
    assert not notices.claim("alice", Sent(NOW, NOW + WEEK), NOW)
    assert notices.records(["alice", "bob"], NOW) == {"alice": record}
    clock.advance(WEEK)
    assert notices.claim("alice", Sent(NOW + WEEK, NOW + 2 * WEEK), NOW + WEEK)


def test_a_released_claim_can_be_taken_again(ledger: tuple[NoticeLedger, FakeClock]) -> None:
    notices, _ = ledger
    record = Sent(NOW, NOW + WEEK)
    assert notices.claim("alice", record, NOW)
    notices.release("alice", record)
    assert notices.records(["alice"], NOW) == {}
    assert notices.claim("alice", record, NOW)


def test_the_file_ledger_is_remembered_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "notices.json"
    FileNoticeLedger(path).claim("alice", Sent(NOW, NOW + WEEK), NOW)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    restarted = FileNoticeLedger(path)
    assert restarted.load() == 1
    assert not restarted.claim("alice", Sent(NOW + 1, NOW + WEEK), NOW + 1)


def test_a_claim_that_cannot_be_saved_sends_nothing_and_changes_nothing(tmp_path: Path) -> None:
    # A file where the state directory should be: no write can succeed, even as root.
    (tmp_path / "state").write_text("")
    ledger = FileNoticeLedger(tmp_path / "state" / "notices.json")
    with pytest.raises(LedgerUnavailable, match="notices not saved"):
        ledger.claim("alice", Sent(NOW, NOW + WEEK), NOW)
    assert ledger.records(["alice"], NOW) == {}


def test_a_damaged_ledger_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notices.json"
    path.write_text('{"format": "popauth-notices", "version": 1, "users": {"a b": {}}}')
    with pytest.raises(StateFileError, match="malformed record"):
        FileNoticeLedger(path).load()


# -- sendmail ---------------------------------------------------------------------------------


def fake_sendmail(tmp_path: Path, body: str) -> Path:
    """A stand-in sendmail: a shell script that records its arguments and input."""
    script = tmp_path / "sendmail"
    script.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/argv"\ncat > "{tmp_path}/message"\n{body}\n'
    )
    script.chmod(0o755)
    return script


def test_sendmail_gets_the_envelope_as_arguments_and_the_message_on_stdin(tmp_path: Path) -> None:
    script = fake_sendmail(tmp_path, "exit 0")
    Sendmail([str(script), "-C", "/etc/x"], timeout=5).submit(
        SENDER, "joe@local.test", b"Subject: x\n\nhi\n"
    )
    assert (tmp_path / "argv").read_text().split("\n")[:-1] == [
        "-C",
        "/etc/x",
        "-i",
        "-f",
        SENDER,
        "--",
        "joe@local.test",
    ]
    assert (tmp_path / "message").read_bytes() == b"Subject: x\n\nhi\n"


@pytest.mark.parametrize(
    ("body", "timeout", "said"),
    [
        ("echo 'no such user' >&2; exit 67", 5.0, "exited with 67: no such user"),
        ("sleep 10", 0.3, "took longer than 0.3 s"),
    ],
)
def test_a_failed_submission_says_why(tmp_path: Path, body: str, timeout: float, said: str) -> None:
    script = fake_sendmail(tmp_path, body)
    with pytest.raises(SubmissionFailed, match=said):
        Sendmail([str(script)], timeout=timeout).submit(SENDER, "joe@local.test", b"x\n")


def test_a_missing_sendmail_is_a_failed_submission(tmp_path: Path) -> None:
    with pytest.raises(SubmissionFailed, match="cannot run"):
        Sendmail([str(tmp_path / "none")], timeout=1).submit(SENDER, "joe@local.test", b"x\n")


# -- the worker --------------------------------------------------------------------------------


class Harness:
    def __init__(
        self,
        tmp_path: Path,
        *,
        schedule: NoticeSchedule | None = None,
        queue_size: int = 10,
        script: str = "exit 0",
        submit: Callable[[str, str, bytes], None] | None = None,
    ) -> None:
        self.clock = FakeClock(NOW)
        self.metrics = Metrics()
        self.log, self.sink = capturing_logger()
        self.script = fake_sendmail(tmp_path, script)
        self.sendmail = Sendmail([str(self.script)], timeout=5)
        self.ledger = FileNoticeLedger(tmp_path / "notices.json")
        self.worker = NoticeWorker(
            schedule=schedule or NoticeSchedule(WEEK, warn=True),
            ledger=self.ledger,
            mail=NoticeMail(read_template(None), SENDER, "local.test"),
            submit=submit or self.sendmail.submit,
            options=NoticeOptions(
                instructions="Port 587.", domain="local.test", queue_size=queue_size, retry=60
            ),
            clock=self.clock,
            metrics=self.metrics,
            log=self.log,
        )
        self.tmp_path = tmp_path

    def count(self, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "popauth_pop_first_notices_total", {"result": result}
        )
        return 0.0 if value is None else value

    def drain(self) -> int:
        handled = 0
        while self.worker.work_once():
            handled += 1
        return handled

    def offer_after(self, seconds: float, user: str) -> int:
        """Offer ``user`` ``seconds`` on; how many the worker then handles."""
        self.clock.advance(seconds)
        self.worker.offer(user)
        return self.drain()

    def events(self) -> list[str]:
        return events(self.sink)

    def logged(self, name: str) -> list[dict[str, object]]:
        return [
            call.kwargs
            for call, event in zip(self.sink.calls, self.events(), strict=True)
            if event == name
        ]


def test_a_user_is_told_once_per_interval(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    harness.worker.offer("alice")
    assert harness.drain() == 1
    assert harness.count("sent") == 1
    assert "To: alice@local.test" in (tmp_path / "message").read_text()
    # More messages the same week: not even queued.
    harness.worker.offer("alice")
    harness.worker.offer("ALICE")
    assert harness.drain() == 0
    harness.clock.advance(WEEK)
    harness.worker.offer("alice")
    assert harness.drain() == 1
    assert harness.count("sent") == 2
    assert harness.events().count("notice_sent") == 2


def test_the_worker_forgets_ended_spells_rarely_and_keeps_current_ones(tmp_path: Path) -> None:
    # Queue size 1: ended spells are dropped past 4 users remembered.
    harness = Harness(tmp_path, queue_size=1)
    users = [f"user{number}" for number in range(10)]
    for user in users:
        harness.worker.offer(user)
        assert harness.drain() == 1
    # All ten are told until next week: the pass at the fifth kept them all,
    # and the next one waits for twice as many users as it left.
    assert len(harness.worker._quiet_until) == 10
    assert harness.worker._forget_past == 10
    for user in users:
        harness.worker.offer(user)
    assert harness.drain() == 0
    harness.clock.advance(WEEK)
    harness.worker.offer("another")
    assert harness.drain() == 1
    # Their week ended: only the newest is remembered, and the bound is back at 4.
    assert harness.worker._quiet_until == {"another": NOW + 2 * WEEK}
    assert harness.worker._forget_past == 4


def test_the_final_week_brings_one_more_notice(tmp_path: Path) -> None:
    schedule = NoticeSchedule(30 * DAY, retire_at=NOW + 10 * DAY)
    harness = Harness(tmp_path, schedule=schedule)
    harness.worker.offer("alice")
    harness.drain()
    harness.clock.advance(2 * DAY)
    harness.worker.offer("alice")
    assert harness.drain() == 0
    harness.clock.advance(1 * DAY)  # the final week starts
    harness.worker.offer("alice")
    assert harness.drain() == 1
    assert "(7 days" in (tmp_path / "message").read_text()
    harness.clock.advance(6 * DAY)
    harness.worker.offer("alice")
    harness.drain()
    assert harness.count("sent") == 2


@pytest.mark.parametrize(
    "schedule",
    [
        NoticeSchedule(WEEK, retire_at=NOW - 1),
        NoticeSchedule(WEEK),
        NoticeSchedule(WEEK, warn=True, retired=True),
    ],
    ids=["after-the-date", "on-without-a-date", "off"],
)
def test_nothing_is_sent_when_notices_do_not_apply(
    tmp_path: Path, schedule: NoticeSchedule
) -> None:
    harness = Harness(tmp_path, schedule=schedule)
    harness.worker.offer("alice")
    assert harness.drain() == 1
    assert harness.count("sent") == 0
    assert not (tmp_path / "message").exists()


def test_a_full_queue_drops_counts_and_logs_once(tmp_path: Path) -> None:
    harness = Harness(tmp_path, queue_size=2)
    for user in ("a", "b", "c", "d", "e"):
        harness.worker.offer(user)
    assert harness.count("dropped") == 3
    assert harness.events().count("notice_queue_full") == 1
    assert harness.drain() == 2
    # The queue takes users again, and a new episode is logged again.
    for user in ("c", "d", "e"):
        harness.worker.offer(user)
    assert harness.events().count("notice_queue_full") == 2


def test_a_failed_submission_is_retried_with_a_growing_wait(tmp_path: Path) -> None:
    # Fails twice, then takes the message.
    tries = tmp_path / "tries"
    script = (
        f'n=$(cat "{tries}" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "{tries}"\n'
        'if [ "$n" -lt 3 ]; then echo "queue file write error" >&2; exit 75; fi\nexit 0'
    )
    harness = Harness(tmp_path, script=script)
    harness.worker.offer("alice")
    assert harness.drain() == 1
    assert harness.count("failed") == 1
    failed = harness.logged("notice_failed")
    assert failed[-1]["retry_in"] == 60 and "exited with 75: queue file write error" in str(
        failed[-1]["error"]
    )
    # Its claim was given back; the retry waits its time.
    assert harness.ledger.records(["alice"], NOW) == {}
    harness.worker.offer("alice")
    assert harness.drain() == 0
    harness.clock.advance(60)
    assert harness.drain() == 1
    failed = harness.logged("notice_failed")
    assert failed[-1]["retry_in"] == 120
    harness.clock.advance(119)
    assert harness.drain() == 0
    harness.clock.advance(1)
    assert harness.drain() == 1
    assert (harness.count("failed"), harness.count("sent")) == (2, 1)
    assert harness.worker.pending_retries() == []
    assert harness.ledger.records(["alice"], NOW + 180) == {
        "alice": Sent(NOW + 180, NOW + 180 + WEEK)
    }


def test_a_claim_that_cannot_be_given_back_stands_until_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = Harness(tmp_path, script="exit 75")

    def unavailable(user: str, record: Sent) -> None:
        raise LedgerUnavailable("redis: connection refused")

    monkeypatch.setattr(harness.ledger, "release", unavailable)
    harness.worker.offer("alice")
    assert harness.drain() == 1
    (release_failed,) = harness.logged("notice_release_failed")
    assert (release_failed["user"], release_failed["error"]) == (
        "alice",
        "redis: connection refused",
    )
    assert harness.count("failed") == 1
    # No retry: alice is told again only when her claim is due, a week on.
    assert harness.worker.pending_retries() == []
    assert "notice_failed" not in harness.events()
    assert harness.offer_after(WEEK - 1, "alice") == 0
    assert harness.offer_after(1, "alice") == 1


def test_a_user_without_an_address_is_logged_not_mailed(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    harness.worker.offer("joe@")
    harness.drain()
    assert "notice_no_address" in harness.events()
    assert harness.count("sent") == 0


def test_the_thread_stops_at_once_even_while_sendmail_hangs(tmp_path: Path) -> None:
    harness = Harness(tmp_path, script="sleep 30")
    worker = NoticeWorker(
        schedule=NoticeSchedule(WEEK, warn=True),
        ledger=harness.ledger,
        mail=NoticeMail(read_template(None), SENDER, "local.test"),
        submit=harness.sendmail.submit,
        cancel=harness.sendmail.cancel,
        options=NoticeOptions(instructions="x", domain="local.test"),
        clock=harness.clock,
        metrics=harness.metrics,
        log=harness.log,
    )
    worker.start()
    worker.offer("alice")
    for _ in range(200):
        if (tmp_path / "message").exists():
            break
        time.sleep(0.01)
    started = time.monotonic()
    worker.stop()
    assert time.monotonic() - started < 3
    assert harness.count("sent") == 0


# -- the gate ------------------------------------------------------------------------------------


def gate_with(offered: list[str]) -> tuple[RelayGate, CapturingLogger]:
    settings = settings_from_mapping({"trusted_networks": [], "local_domains": ["local.test"]})
    clock = FakeClock()
    store = MemoryStore(ttl=900, max_entries=10, clock=clock)
    store.grant(parse_client_address("198.51.100.7"), "alice")
    log, sink = capturing_logger()
    gate = RelayGate(
        policy=settings.relay.policy(LocalDelivery.configured(["local.test"], ["local"])),
        store=store,
        keying=WhitelistKeying(),
        ledger=UsageLedger(max_users=10, clock=clock),
        accounting=Accounting.MESSAGES,
        metrics=Metrics(),
        log=log,
        pop_first_relayed=offered.append,
    )
    return gate, sink


def test_the_gate_offers_the_login_user_of_each_pop_first_message() -> None:
    offered: list[str] = []
    gate, _ = gate_with(offered)
    gate.message(parse_client_address("198.51.100.7"), "", "<alice@local.test>")
    gate.message(parse_client_address("198.51.100.7"), "carol", "<carol@local.test>")
    gate.message(parse_client_address("198.51.100.8"), "", "<x@local.test>")
    assert offered == ["alice"]


# -- popauth notices --dry-run ------------------------------------------------------------------


def test_the_dry_run_shows_who_is_due_and_their_text(tmp_path: Path) -> None:
    from popauth.daemon.notices import dry_run_lines
    from popauth.store.accounts import RelayWay

    clock = FakeClock(NOW)
    usage = UsageLedger(max_users=10, clock=clock)
    for user in ("alice", "bob"):
        usage.record(user, RelayWay.POP_FIRST, messages=1, recipients=1)
    usage.record("carol", RelayWay.SMTP_AUTH, messages=1, recipients=1)
    usage.save(tmp_path / "usage.json")
    FileNoticeLedger(tmp_path / "notices.json").claim("bob", Sent(NOW - DAY, NOW + 6 * DAY), NOW)
    settings = settings_from_mapping(
        {
            "pop_first": "warn",
            "pop_first_notices": True,
            "usage_path": str(tmp_path / "usage.json"),
            "pop_first_notice_path": str(tmp_path / "notices.json"),
        }
    )
    local = LocalDelivery.configured(["local.test"], ["local"])
    lines = list(dry_run_lines(settings, local, now=NOW + 60))
    assert "alice: would be sent a notice now, to alice@local.test:" in lines
    assert "    To: alice@local.test" in lines
    assert "    Hello alice," in lines
    assert any(line.startswith("bob: told 2027-") and "next notice due" in line for line in lines)
    assert "bob: told 2027-01-14 08:00:00 UTC, next notice due 2027-01-21 08:00:00 UTC" in lines
    assert not any(line.startswith("carol") for line in lines)
    assert lines[-1] == "1 of 2 users who relayed by POP-first recently would be sent a notice"
    # A week on, with no notice since, both are due; nothing was written.
    later = list(dry_run_lines(settings, local, now=NOW + WEEK))
    assert later[-1] == "2 of 2 users who relayed by POP-first recently would be sent a notice"


def test_the_dry_run_says_when_no_notices_go_out(tmp_path: Path) -> None:
    from popauth.daemon.notices import dry_run_lines

    settings = settings_from_mapping({"usage_path": str(tmp_path / "usage.json")})
    lines = list(dry_run_lines(settings, LocalDelivery.configured(["local.test"], ["local"]), NOW))
    assert lines[0] == "pop_first_notices is off: nothing is sent; were it on:"
    assert lines[1].startswith("no notices now:")


def test_an_unexpected_error_is_logged_and_the_user_offered_again_later(tmp_path: Path) -> None:
    def broken(sender: str, recipient: str, message: bytes) -> None:
        raise RuntimeError("a bug")

    harness = Harness(tmp_path, submit=broken)
    harness.worker.offer("alice")
    assert harness.drain() == 1
    assert [call["user"] for call in harness.logged("notice_worker_failed")] == ["alice"]
    assert harness.offer_after(0, "alice") == 0
    assert harness.offer_after(60, "alice") == 1


def test_notices_need_a_domain_for_their_sender(tmp_path: Path) -> None:
    from popauth.daemon.notices import notice_parts

    settings = settings_from_mapping({"pop_first_notices": True})
    with pytest.raises(ConfigError, match="pop_first_notices needs a local domain"):
        notice_parts(settings, LocalDelivery.configured([], ["local"]))
    chosen = settings_from_mapping({"pop_first_notice_domain": "example.org"})
    parts = notice_parts(chosen, LocalDelivery.configured([], ["local"]))
    assert (parts.mail.sender, parts.options.domain) == ("postmaster@example.org", "example.org")
