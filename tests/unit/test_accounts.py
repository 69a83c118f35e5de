from __future__ import annotations

import json
from pathlib import Path

import pytest

from popauth.basics.errors import StateFileError
from popauth.store.accounts import FileBlockList, RelayWay, UsageLedger
from tests.support.clock import FakeClock


def test_ledger_counts_each_way_and_reports_pop_first_users_most_recent_first() -> None:
    clock = FakeClock()
    ledger = UsageLedger(max_users=10, clock=clock)
    ledger.record("alice", RelayWay.POP_FIRST, messages=1, recipients=2)
    clock.advance(10)
    ledger.record("bob", RelayWay.SMTP_AUTH, messages=1, recipients=1)
    clock.advance(10)
    ledger.record("carol", RelayWay.POP_FIRST, messages=1, recipients=0)
    clock.advance(10)
    ledger.record("alice", RelayWay.POP_FIRST, messages=1, recipients=1)
    ledger.record("alice", RelayWay.SMTP_AUTH, messages=1, recipients=3)
    ledger.record("", RelayWay.POP_FIRST, messages=1, recipients=1)  # unknown user: not kept
    report = ledger.pop_first_users()
    assert [user for user, _ in report] == ["alice", "carol"]
    alice = report[0][1]
    assert (alice.pop_messages, alice.pop_recipients) == (2, 3)
    assert (alice.auth_messages, alice.auth_recipients) == (1, 3)
    assert alice.pop_first_seen == clock.time() - 30
    assert alice.pop_last_seen == clock.time()


def test_ledger_is_bounded_by_recent_activity() -> None:
    ledger = UsageLedger(max_users=2, clock=FakeClock())
    for user in ("a", "b", "a", "c"):
        ledger.record(user, RelayWay.POP_FIRST, messages=1, recipients=1)
    assert {user for user, _ in ledger.pop_first_users()} == {"a", "c"}


def test_reading_the_ledger_is_not_activity(tmp_path: Path) -> None:
    ledger = UsageLedger(max_users=3, clock=FakeClock())
    for user in ("a", "b", "c", "a"):
        ledger.record(user, RelayWay.POP_FIRST, messages=1, recipients=1)
    # Listings, a save, a scrape's count and a look-up read every user; b stays
    # the least recently active, and is the one dropped for d.
    ledger.users()
    ledger.pop_first_users()
    ledger.pop_first_users_since(0)
    ledger.save(tmp_path / "usage.json")
    assert ledger.get("b") is not None
    ledger.record("d", RelayWay.POP_FIRST, messages=1, recipients=1)
    assert {user for user, _ in ledger.users()} == {"a", "c", "d"}


def test_a_loaded_ledger_keeps_the_most_recently_active(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = UsageLedger(max_users=3, clock=clock)
    for user in ("a", "b", "c"):
        ledger.record(user, RelayWay.POP_FIRST, messages=1, recipients=1)
        clock.advance(10)
    ledger.save(tmp_path / "usage.json")
    smaller = UsageLedger(max_users=2, clock=clock)
    assert smaller.load(tmp_path / "usage.json") == 3
    assert [user for user, _ in smaller.users()] == ["c", "b"]


def test_ledger_persists(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = UsageLedger(max_users=10, clock=clock)
    ledger.record("alice", RelayWay.POP_FIRST, messages=2, recipients=5)
    path = tmp_path / "usage.json"
    ledger.save(path)
    restored = UsageLedger(max_users=10, clock=clock)
    assert restored.load(path) == 1
    assert restored.get("alice") == ledger.get("alice")
    path.write_text(json.dumps({"format": "popauth-usage", "version": 1, "users": []}))
    with pytest.raises(StateFileError, match="no user table"):
        UsageLedger(max_users=10, clock=clock).load(path)


def test_block_list_is_written_through(tmp_path: Path) -> None:
    path = tmp_path / "blocked.json"
    blocks = FileBlockList(path)
    assert blocks.add("mallory")
    assert not blocks.add("mallory")
    assert "mallory" in blocks
    assert FileBlockList(path).users() == ["mallory"]
    assert blocks.remove("mallory")
    assert not blocks.remove("mallory")
    assert FileBlockList(path).users() == []


def test_block_list_keeps_names_caseless(tmp_path: Path) -> None:
    path = tmp_path / "blocked.json"
    # As written before names were kept caseless.
    path.write_text(
        json.dumps(
            {"format": "popauth-blocklist", "version": 1, "users": ["Alice", "alice", "BOB"]}
        )
    )
    blocks = FileBlockList(path)
    assert blocks.users() == ["alice", "bob"]
    assert "ALICE" in blocks
    assert "Bob" in blocks
    assert not blocks.add("Älice")
    assert blocks.remove("ALICE")
    assert FileBlockList(path).users() == ["bob"]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b'{"format": "other"}',
        b'{"format": "popauth-blocklist", "version": 1, "users": [1]}',
    ],
)
def test_damaged_block_list_stops_start(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "blocked.json"
    path.write_bytes(content)
    with pytest.raises(StateFileError, match="block list"):
        FileBlockList(path)


def test_missing_block_list_is_empty(tmp_path: Path) -> None:
    assert FileBlockList(tmp_path / "absent.json").users() == []
    assert FileBlockList(None).add("x")


def test_the_weekly_trend_turns_at_monday_midnight_utc_to_the_second() -> None:
    """The trend names a week again only when a note leaves the week last
    named: the second after Sunday's last one is already the new ISO week,
    however many notes came that week."""
    from popauth.store.accounts import WeekEvent, WeeklyTrend

    trend = WeeklyTrend(max_users=10)
    sunday_last_second = 1_796_601_599.0  # 2026-12-06T23:59:59Z, a Sunday of 2026-W49
    for user in ("alice", "bob"):
        trend.note(WeekEvent.POP_FIRST, user, sunday_last_second - 3600)
    trend.note(WeekEvent.POP_FIRST, "carol", sunday_last_second)
    trend.note(WeekEvent.POP_FIRST, "dave", sunday_last_second + 1)
    rows = trend.rows()
    assert [(week.week, week.pop_first) for week in rows] == [("2026-W49", 3), ("2026-W50", 1)]
