"""The campaign's progress: ``popauth report --campaign``, its ledger, its gauges.

The usage ledger counts refusals for retirement and keeps a bounded weekly
trend; the notice ledger keeps who was told how often; REPORT view=campaign
joins them with the graduates and the exempt users; the metrics read the
same at scrape time. The notice rules (no notice to an exempt or a
graduated user) are tested at the gate and in ``notices --dry-run``.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from popauth.basics.clock import rfc3339
from popauth.basics.errors import StateFileError
from popauth.cli import main
from popauth.config import settings_from_mapping
from popauth.daemon.notices import dry_run_lines
from popauth.daemon.serve import campaign_gauges
from popauth.doors.ingest.report import campaign_report, report_rows
from popauth.localdelivery import LocalDelivery
from popauth.notices.ledger import FileNoticeLedger, NoticeHistory, Sent
from popauth.relay.decision import Campaign, Reason
from popauth.store.accounts import (
    TREND_WEEKS,
    FileGraduates,
    RelayWay,
    UsageLedger,
    Week,
    WeekEvent,
    iso_week,
    week_start,
)
from popauth.store.statefile import write_json_atomically
from popauth.telemetry.metrics import Metrics
from tests.support.clock import FakeClock
from tests.support.ingest_endpoint import Endpoint
from tests.unit.test_campaign import CLIENT, REMOTE, START, Books

# A Monday, 00:00 UTC: 2027-01-04 starts ISO week 2027-W01.
MONDAY = 1_799_020_800.0
# The in-process endpoint's clock (tests.support.ingest_endpoint) reads
# 1_800_000_000: Friday 2027-01-15 08:00 UTC, in ISO week 2027-W02.
WEEK = 7 * 86_400.0
DAY = 86_400.0


# --- the usage ledger: refusals and the weekly trend ---------------------------


def test_iso_week_names_the_week_of_a_moment() -> None:
    assert iso_week(MONDAY) == "2027-W01"
    assert iso_week(MONDAY - 1) == "2026-W53"
    assert iso_week(MONDAY + WEEK) == "2027-W02"


def test_week_start_is_the_monday_at_midnight_utc_that_began_the_week() -> None:
    assert week_start(MONDAY) == MONDAY
    # Sunday 2027-01-03 23:59:59 is in the week of Monday 2026-12-28.
    assert week_start(MONDAY - 1) == 1_798_416_000
    # Friday 2027-01-15 08:00: the week of Monday 2027-01-11.
    assert week_start(1_800_000_000) == 1_799_625_600
    # The epoch's own day, a Thursday: the week began Monday 1969-12-29.
    assert week_start(0) == -259_200


def test_the_trend_turns_its_week_at_monday_midnight_however_often_it_is_told() -> None:
    clock = FakeClock(MONDAY + WEEK - 1)
    ledger = UsageLedger(max_users=10, clock=clock)
    ledger.record("alice", RelayWay.POP_FIRST, messages=1, recipients=0)
    clock.advance(1)
    ledger.record("bob", RelayWay.POP_FIRST, messages=1, recipients=0)
    ledger.record("carol", RelayWay.POP_FIRST, messages=1, recipients=0)
    assert ledger.weeks() == [Week("2027-W01", pop_first=1), Week("2027-W02", pop_first=2)]


def test_the_trend_counts_each_user_once_a_week_and_folds_finished_weeks() -> None:
    clock = FakeClock(MONDAY)
    ledger = UsageLedger(max_users=10, clock=clock)
    for _ in range(3):
        ledger.record("alice", RelayWay.POP_FIRST, messages=1, recipients=0)
    ledger.record("bob", RelayWay.POP_FIRST, messages=1, recipients=0)
    ledger.record("bob", RelayWay.SMTP_AUTH, messages=1, recipients=0)
    ledger.note(WeekEvent.GRADUATED, "bob")
    clock.advance(WEEK)
    ledger.note(WeekEvent.NOTIFIED, "alice")
    ledger.record("alice", RelayWay.POP_FIRST, messages=1, recipients=0)
    assert ledger.weeks() == [
        Week("2027-W01", pop_first=2, smtp_auth=1, graduated=1, notified=0),
        Week("2027-W02", pop_first=1, smtp_auth=0, graduated=0, notified=1),
    ]


def test_the_trend_keeps_at_most_a_year_of_finished_weeks_and_bounds_its_names() -> None:
    clock = FakeClock(MONDAY)
    ledger = UsageLedger(max_users=3, clock=clock)
    for week in range(TREND_WEEKS + 10):
        for user in ("a", "b", "c", "d", "e"):
            ledger.record(user, RelayWay.POP_FIRST, messages=1, recipients=0)
        clock.advance(WEEK if week < TREND_WEEKS + 9 else 0)
    weeks = ledger.weeks()
    # 52 finished weeks and the current one, 61 weeks after MONDAY (2028-03-06);
    # each week's names at most max_users.
    assert len(weeks) == TREND_WEEKS + 1
    assert weeks[-1].week == "2028-W10"
    assert {week.pop_first for week in weeks} == {3}


def test_retired_refusals_and_the_trend_survive_a_save(tmp_path: Path) -> None:
    clock = FakeClock(MONDAY)
    ledger = UsageLedger(max_users=10, clock=clock)
    ledger.record("alice", RelayWay.POP_FIRST, messages=2, recipients=0)
    clock.advance(WEEK)
    ledger.record_retired_refusal("alice")
    ledger.record_retired_refusal("alice")
    ledger.record("bob", RelayWay.SMTP_AUTH, messages=1, recipients=0)
    ledger.save(tmp_path / "usage.json")
    document = json.loads((tmp_path / "usage.json").read_text())
    # The user records keep the first version's fields: an older popauth loads them.
    first_version = "pop_messages pop_recipients pop_first_seen pop_last_seen"
    first_version += " auth_messages auth_recipients auth_first_seen auth_last_seen"
    assert set(document["users"]["alice"]) == set(first_version.split())
    again = UsageLedger(max_users=10, clock=clock)
    assert again.load(tmp_path / "usage.json") == 2
    alice = again.get("alice")
    assert alice is not None
    assert (alice.pop_messages, alice.retired_refusals) == (2, 2)
    assert alice.retired_last_refused == MONDAY + WEEK
    assert again.weeks() == ledger.weeks()


def test_the_saved_trend_holds_counts_and_only_the_notified_by_name(tmp_path: Path) -> None:
    clock = FakeClock(MONDAY)
    ledger = UsageLedger(max_users=10, clock=clock)
    ledger.record("alice", RelayWay.POP_FIRST, messages=1, recipients=0)
    ledger.record("bob", RelayWay.SMTP_AUTH, messages=1, recipients=0)
    ledger.note(WeekEvent.NOTIFIED, "alice")
    ledger.save(tmp_path / "usage.json")
    weeks = json.loads((tmp_path / "usage.json").read_text())["weeks"]
    assert weeks["counts"] == {"pop_first": 1, "smtp_auth": 1}
    assert weeks["users"] == {"notified": ["alice"]}
    # Restarted the same week: alice's relays and notice are hers already.
    again = UsageLedger(max_users=10, clock=clock)
    again.load(tmp_path / "usage.json")
    again.record("alice", RelayWay.POP_FIRST, messages=1, recipients=0)
    again.note(WeekEvent.NOTIFIED, "alice")
    again.record("carol", RelayWay.POP_FIRST, messages=1, recipients=0)
    assert again.weeks() == [Week("2027-W01", pop_first=2, smtp_auth=1, notified=1)]


def test_a_trend_saved_with_every_event_by_name_loads_them_counted(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"
    names = {"pop_first": ["alice", "bob"], "smtp_auth": ["bob"], "graduated": ["bob"]}
    write_json_atomically(
        path,
        {
            "format": "popauth-usage",
            "version": 1,
            "users": {},
            "weeks": {
                "current": "2027-W01",
                "users": {**names, "notified": ["alice"]},
                "finished": [],
            },
        },
    )
    ledger = UsageLedger(max_users=10, clock=FakeClock(MONDAY))
    ledger.load(path)
    ledger.note(WeekEvent.NOTIFIED, "alice")
    assert ledger.weeks() == [Week("2027-W01", pop_first=2, smtp_auth=1, graduated=1, notified=1)]


def test_a_usage_file_written_before_the_campaign_report_loads(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"
    record = {
        "pop_messages": 4,
        "pop_recipients": 0,
        "pop_first_seen": MONDAY - DAY,
        "pop_last_seen": MONDAY,
        "auth_messages": 0,
        "auth_recipients": 0,
        "auth_first_seen": 0,
        "auth_last_seen": 0,
    }
    write_json_atomically(
        path, {"format": "popauth-usage", "version": 1, "users": {"alice": record}}
    )
    ledger = UsageLedger(max_users=10, clock=FakeClock(MONDAY))
    assert ledger.load(path) == 1
    alice = ledger.get("alice")
    assert alice is not None and (alice.pop_messages, alice.retired_refusals) == (4, 0)
    assert ledger.weeks() == [Week("2027-W01")]


def test_a_malformed_trend_stops_the_load_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"
    bad_week = {"week": "2027-W01", "pop_first": -1, "smtp_auth": 0, "graduated": 0, "notified": 0}
    write_json_atomically(
        path,
        {
            "format": "popauth-usage",
            "version": 1,
            "users": {},
            "weeks": {"current": "2027-W02", "users": {}, "finished": [bad_week]},
        },
    )
    ledger = UsageLedger(max_users=10, clock=FakeClock(MONDAY))
    ledger.record("alice", RelayWay.POP_FIRST, messages=1, recipients=0)
    with pytest.raises(StateFileError, match="weeks"):
        ledger.load(path)
    assert ledger.weeks() == [Week("2027-W01", pop_first=1)]


# --- the gate: refusals counted, notices offered only to whom they concern ----


def _send(books: Books, auth: str = "", recipients: int = 1) -> list[Reason]:
    """One message from CLIENT to ``recipients`` remote recipients: each one's reason."""
    decision, message = books.gate.message(CLIENT, auth)
    if decision is not None:
        return [decision.reason] * recipients
    return [books.gate.recipient(message, REMOTE).reason for _ in range(recipients)]


def test_a_refusal_for_retirement_is_counted_once_per_message(tmp_path: Path) -> None:
    books = Books(
        FileGraduates(tmp_path / "graduates.json"), pop_first_retire_at=rfc3339(START + 60)
    )
    books.store.grant(CLIENT, "alice")
    assert _send(books) == [Reason.WHITELISTED]
    books.clock.advance(60)
    assert _send(books, recipients=3) == [Reason.POP_FIRST_RETIRED] * 3
    assert _send(books) == [Reason.POP_FIRST_RETIRED]
    alice = books.ledger.get("alice")
    assert alice is not None
    assert (alice.retired_refusals, alice.retired_last_refused) == (2, START + 60)


def test_an_exempt_user_is_offered_no_notice_and_another_is(tmp_path: Path) -> None:
    books = Books(
        FileGraduates(tmp_path / "graduates.json"),
        pop_first_retire_at=rfc3339(START + DAY),
        pop_first_exempt_users=["carol"],
    )
    books.store.grant(CLIENT, "carol")
    assert _send(books) == [Reason.WHITELISTED]
    books.store.grant(CLIENT, "alice")
    assert _send(books) == [Reason.WHITELISTED]
    assert books.offered == ["alice"]


def test_a_graduated_user_is_offered_no_notice(tmp_path: Path) -> None:
    books = Books(
        FileGraduates(tmp_path / "graduates.json"),
        pop_first_retire_at=rfc3339(START + DAY),
        pop_first_graduate=True,
    )
    books.store.grant(CLIENT, "bob")
    books.store.grant(CLIENT, "alice")
    assert _send(books, auth="alice") == [Reason.SMTP_AUTH]
    # The entry's newest login is alice, graduated; bob still relays for it.
    assert _send(books) == [Reason.WHITELISTED]
    assert books.offered == []
    assert books.ledger.weeks()[-1].graduated == 1
    books.store.grant(CLIENT, "bob")
    assert _send(books) == [Reason.WHITELISTED]
    assert books.offered == ["bob"]


# --- the notice ledger's history ------------------------------------------------


def test_the_notice_history_outlives_the_claims_and_old_files_load(tmp_path: Path) -> None:
    path = tmp_path / "notices.json"
    write_json_atomically(
        path,
        {
            "format": "popauth-notices",
            "version": 1,
            "users": {"alice": {"sent_at": MONDAY, "due_at": MONDAY + WEEK}},
        },
    )
    ledger = FileNoticeLedger(path)
    assert ledger.load() == 1
    assert ledger.history() == {}
    ledger.note_sent("Alice", MONDAY)
    assert ledger.claim("bob", Sent(MONDAY + WEEK, MONDAY + 2 * WEEK), MONDAY + WEEK)
    ledger.note_sent("alice", MONDAY + WEEK)
    again = FileNoticeLedger(path)
    again.load()
    # alice's claim was due again and dropped; her history stays.
    assert again.records(["alice"], MONDAY + WEEK) == {}
    assert again.history() == {"alice": NoticeHistory(2, MONDAY + WEEK)}


# --- REPORT view=campaign and popauth report --campaign ------------------------


def _campaign_endpoint(tmp_path: Path) -> Endpoint:
    told = {"alice": NoticeHistory(2, MONDAY + 3_600)}
    endpoint = Endpoint(
        tmp_path,
        campaign=Campaign(retire_at=MONDAY + DAY, exempt_users=frozenset({"carol"})),
        notice_history=lambda: told,
    )
    endpoint.ledger.record("alice", RelayWay.POP_FIRST, messages=2, recipients=0)
    endpoint.ledger.record("carol", RelayWay.POP_FIRST, messages=1, recipients=0)
    endpoint.ledger.record("dave", RelayWay.SMTP_AUTH, messages=1, recipients=0)
    endpoint.ledger.record_retired_refusal("alice")
    endpoint.graduates.graduate("erin", MONDAY)
    return endpoint


def test_report_view_campaign_names_every_user_of_the_campaign(tmp_path: Path) -> None:
    endpoint = _campaign_endpoint(tmp_path)
    endpoint.server.start()
    try:
        reply = endpoint.ask("REPORT view=campaign")
        wrong = endpoint.ask("REPORT view=other")
        plain = endpoint.ask("REPORT")
    finally:
        endpoint.server.stop()
    report = campaign_report(reply[1:])
    assert reply[0] == f"OK count={len(reply) - 1}"
    assert report.retire_at == MONDAY + DAY
    users = {row["user"]: row for row in report.users}
    # dave only ever relayed by SMTP AUTH: not a user of the campaign.
    assert set(users) == {"alice", "carol", "erin"}
    assert users["alice"]["refused_since_retirement"] == "1"
    assert (users["alice"]["notices"], users["alice"]["notified"]) == ("2", "1799024400")
    assert users["carol"]["exempt"] == "yes"
    assert users["erin"]["graduated"] == "1799020800"
    assert len(report.weeks) == 1 and report.weeks[0]["pop_first"] == "2"
    assert wrong[0].startswith("ERR syntax REPORT's only view is view=campaign")
    # The plain REPORT is as it was: no campaign fields.
    assert "refused_since_retirement" not in " ".join(plain)
    assert {row["user"] for row in report_rows(plain[1:])} == {"alice", "carol", "erin"}


def _report(tmp_path: Path, capsys: pytest.CaptureFixture[str], *options: str) -> str:
    endpoint = _campaign_endpoint(tmp_path)
    endpoint.server.start()
    try:
        status = main(["report", "--socket", str(endpoint.path), "--campaign", *options])
    finally:
        endpoint.server.stop()
    assert status == 0
    return capsys.readouterr().out


def test_report_campaign_prints_a_table_a_total_and_the_weeks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _report(tmp_path, capsys)
    lines = out.splitlines()
    assert lines[0].startswith("campaign: POP first retired at 2027-01-05T00:00:00Z (")
    header = "user pop_last_seen auth_last_seen notified notices graduated exempt"
    assert lines[1].split() == [*header.split(), "refused_since_retirement"]
    alice = next(line for line in lines if line.startswith("alice "))
    assert alice.split()[-4:] == ["2", "-", "no", "1"]
    total = next(line for line in lines if line.startswith("total (3 users)"))
    # pop, auth, notified, notices, graduated, exempt, refused.
    assert total.split()[3:] == ["2", "0", "1", "2", "1", "1", "1"]
    weekly = lines.index("weekly trend (users per ISO week):")
    assert lines[weekly + 1].split() == ["week", "pop_first", "smtp_auth", "graduated", "notified"]
    assert lines[weekly + 2].split() == ["2027-W02", "2", "1", "0", "0"]


def test_report_campaign_as_csv_and_the_weekly_trend_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = list(csv.DictReader(io.StringIO(_report(tmp_path, capsys, "--format", "csv"))))
    assert [row["user"] for row in rows] == ["alice", "carol", "erin", "total (3 users)"]
    assert rows[0]["refused_since_retirement"] == "1"
    assert rows[1]["exempt"] == "yes"
    weeks = list(
        csv.DictReader(io.StringIO(_report(tmp_path, capsys, "--format", "csv", "--weekly")))
    )
    assert weeks == [
        {
            "week": "2027-W02",
            "pop_first": "2",
            "smtp_auth": "1",
            "graduated": "0",
            "notified": "0",
        }
    ]
    table = _report(tmp_path, capsys, "--weekly")
    assert table.splitlines()[0] == "weekly trend (users per ISO week):"
    assert "alice" not in table


def test_report_campaign_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = json.loads(_report(tmp_path, capsys, "--format", "json"))
    assert document["retire_at"] == "2027-01-05T00:00:00Z"
    assert document["total"]["refused_since_retirement"] == "1"
    assert [week["week"] for week in document["weeks"]] == ["2027-W02"]


# --- the gauges -------------------------------------------------------------------


def _scrape(metrics: Metrics) -> dict[str, float]:
    found = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("popauth_pop_first_") and "notices" not in line:
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def test_the_gauges_read_the_ledger_at_each_scrape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = 1_900_000_000.0
    monkeypatch.setattr("popauth.daemon.serve.time.time", lambda: now)
    clock = FakeClock(now - 20 * DAY)
    ledger = UsageLedger(max_users=10, clock=clock)
    graduates = FileGraduates(tmp_path / "graduates.json")
    ledger.record("old", RelayWay.POP_FIRST, messages=1, recipients=0)
    clock.advance(19 * DAY)
    ledger.record("recent", RelayWay.POP_FIRST, messages=1, recipients=0)
    ledger.record("auth", RelayWay.SMTP_AUTH, messages=1, recipients=0)
    graduates.graduate("auth", now)
    campaign = Campaign(exempt_users=frozenset({"carol", "dan"}))
    metrics = Metrics()
    metrics.track_campaign(lambda: campaign_gauges(ledger, graduates, lambda: campaign))
    assert _scrape(metrics) == {
        'popauth_pop_first_users{days="7"}': 1.0,
        'popauth_pop_first_users{days="30"}': 2.0,
        "popauth_pop_first_graduated_users": 1.0,
        "popauth_pop_first_exempt_users": 2.0,
    }
    graduates.reinstate("auth", now)
    clock.advance(DAY)
    ledger.record("old", RelayWay.POP_FIRST, messages=1, recipients=0)
    assert _scrape(metrics)['popauth_pop_first_users{days="7"}'] == 2.0
    assert _scrape(metrics)["popauth_pop_first_graduated_users"] == 0.0


# --- notices --dry-run skips exempt and graduated users ---------------------------


def test_the_notices_dry_run_names_and_skips_exempt_and_graduated_users(tmp_path: Path) -> None:
    now = MONDAY
    settings = settings_from_mapping(
        {
            "trusted_networks": [],
            "local_domains": ["local.test"],
            "pop_first_retire_at": rfc3339(now + 30 * DAY),
            "pop_first_exempt_users": ["carol"],
            "pop_first_graduate": True,
            "pop_first_notices": True,
            "usage_path": str(tmp_path / "usage.json"),
            "graduates_path": str(tmp_path / "graduates.json"),
            "pop_first_notice_path": str(tmp_path / "notices.json"),
        }
    )
    ledger = UsageLedger(max_users=10, clock=FakeClock(now - 60))
    for user in ("alice", "carol", "erin"):
        ledger.record(user, RelayWay.POP_FIRST, messages=1, recipients=0)
    ledger.save(tmp_path / "usage.json")
    FileGraduates(tmp_path / "graduates.json").graduate("erin", now - 30)
    lines = list(
        dry_run_lines(settings, LocalDelivery.configured(["local.test"], ["local"]), now=now)
    )
    text = "\n".join(lines)
    assert "carol: exempt (pop_first_exempt_users): POP-first does not end, no notice" in lines
    assert "erin: graduated to SMTP AUTH (pop_first_graduate): no notice" in lines
    assert "alice: would be sent a notice now, to alice@local.test:" in text
    assert lines[-1] == "1 of 3 users who relayed by POP-first recently would be sent a notice"


def test_report_campaign_and_the_dry_run_are_asked_one_at_a_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        [
            "report",
            "--socket",
            str(tmp_path / "none.sock"),
            "--campaign",
            "--retire-at",
            "2030-01-01",
        ]
    )
    assert status == 2
    assert "--campaign and --retire-at are two reports" in capsys.readouterr().err
