"""State files on disk: where they may live, what a damaged one may not do.

Whoever can write the state directory could swap a file or aim popauth's
write at another file through a planted link; and a hand-edited or damaged
record (a line break in a user name, NaN in a count) must be dropped and
logged, never served.
"""

from __future__ import annotations

import itertools
import json
import os
import pwd
import threading
from pathlib import Path

import pytest

from popauth.basics.addresses import WhitelistKeying
from popauth.basics.errors import (
    StateDirectoryUnsafe,
    StateFileError,
    StateFileMissing,
    StateWriteError,
)
from popauth.config import IngestSettings, settings_from_mapping
from popauth.daemon.serve import open_state
from popauth.doors.ingest.client import IngestClient
from popauth.doors.ingest.server import IngestServer, PeerPolicy
from popauth.store.accounts import FileBlockList, RelayWay, UsageLedger
from popauth.store.memory import MemoryStore
from popauth.store.snapshot import Snapshotter
from popauth.store.statefile import (
    read_json_document,
    saved_count,
    saved_number,
    saved_time,
    write_json_atomically,
)
from popauth.telemetry.metrics import Metrics
from tests.support.clock import FakeClock
from tests.support.logs import capturing_logger
from tests.support.peers import needs_root

DOCUMENT = {"format": "popauth-whitelist", "version": 1, "saved_at": 1.0, "entries": []}


def test_a_planted_link_at_the_temporary_name_is_not_followed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = state / "whitelist.json"
    # Every name an attacker could guess: this process, this thread.
    for guess in (
        f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp",
        f".{path.name}.tmp",
        f"{path.name}.tmp",
    ):
        (state / guess).symlink_to(victim)
    write_json_atomically(path, DOCUMENT)
    assert victim.read_text() == "precious\n"
    assert json.loads(path.read_text()) == DOCUMENT
    assert not path.is_symlink()


def test_a_state_file_that_is_a_link_is_not_read(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(DOCUMENT))
    (tmp_path / "whitelist.json").symlink_to(elsewhere)
    with pytest.raises(StateFileError, match="symbolic link"):
        read_json_document(tmp_path / "whitelist.json", "popauth-whitelist", 1)


def test_missing_file_is_a_type_not_a_message(tmp_path: Path) -> None:
    with pytest.raises(StateFileMissing):
        read_json_document(tmp_path / "absent.json", "popauth-whitelist", 1)


@needs_root
@pytest.mark.parametrize(
    ("mode", "owner", "reason"),
    [
        (0o770, "root", "writable by group or others"),
        (0o777, "root", "writable by group or others"),
        (0o1777, "root", "writable by group or others"),
        (0o700, "nobody", "owned by uid"),
    ],
)
def test_a_directory_others_can_write_is_refused(
    tmp_path: Path, mode: int, owner: str, reason: str
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    os.chown(state, pwd.getpwnam(owner).pw_uid, -1)
    for key, name in (
        ("snapshot_path", "whitelist.json"),
        ("usage_path", "usage.json"),
        ("blocklist_path", "blocked.json"),
    ):
        settings = settings_from_mapping(
            {"snapshot_path": "", "usage_path": "", "blocklist_path": "", key: str(state / name)}
        )
        with pytest.raises(StateDirectoryUnsafe, match=reason):
            open_state(settings, FakeClock(), capturing_logger()[0])
    # Nor is anything written there later.
    with pytest.raises(StateWriteError, match=reason):
        write_json_atomically(state / "whitelist.json", DOCUMENT)
    assert list(state.iterdir()) == []


def test_a_private_directory_is_accepted_and_created(tmp_path: Path) -> None:
    settings = settings_from_mapping(
        {
            "snapshot_path": str(tmp_path / "new" / "whitelist.json"),
            "usage_path": str(tmp_path / "new" / "usage.json"),
            "blocklist_path": str(tmp_path / "new" / "blocked.json"),
        }
    )
    open_state(settings, FakeClock(), capturing_logger()[0])
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700


# --- damaged records: dropped, logged, never served --------------------------


def snapshot_with(entries: list[object]) -> str:
    return json.dumps({**DOCUMENT, "entries": entries})


def test_snapshot_entries_that_would_break_framing_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "whitelist.json"
    now = FakeClock().time()
    path.write_text(
        snapshot_with(
            [
                ["192.0.2.1", "alice", now, now + 600],
                ["192.0.2.2", "eve\nOK count=99", now, now + 600],
                ["192.0.2.3", "bob carol", now, now + 600],
                ["192.0.2.4", "dave", now, 1e999],
                ["192.0.2.5", "", now, now + 600],
                ["192.0.2.6", "frank", True, now + 600],
                ["192.0.2.7", "gina", now],
            ]
        ).replace("1e999", "Infinity")
    )
    log, sink = capturing_logger()
    store = MemoryStore(ttl=900, max_entries=10, clock=FakeClock())
    Snapshotter(store=store, path=path, clock=FakeClock(), log=log).restore()
    restored = itertools.chain.from_iterable(store.entry_chunks())
    assert [grant.user for grant in restored] == ["alice", ""]
    assert store.stats().entries == 2
    dropped = [c.kwargs for c in sink.calls if c.kwargs.get("event") == "snapshot_entry_dropped"]
    assert [event["entry"] for event in dropped] == [1, 2, 3, 5, 6]
    assert all(c.method_name == "error" for c in sink.calls if c.kwargs in dropped)


def test_usage_records_with_nan_or_bad_names_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"
    good = {
        "pop_messages": 3,
        "pop_recipients": 4,
        "pop_first_seen": 10.0,
        "pop_last_seen": 20.0,
        "auth_messages": 0,
        "auth_recipients": 0,
        "auth_first_seen": 0.0,
        "auth_last_seen": 0.0,
    }
    users = {
        "alice": good,
        "nan": {**good, "pop_messages": "NAN_HERE"},
        "negative": {**good, "pop_recipients": -1},
        "fraction": {**good, "pop_messages": 1.5},
        "line\nbreak": good,
        "missing": {"pop_messages": 1},
        "extra": {**good, "admin": 1},
    }
    text = json.dumps({"format": "popauth-usage", "version": 1, "users": users})
    path.write_text(text.replace('"NAN_HERE"', "NaN"))
    log, sink = capturing_logger()
    ledger = UsageLedger(max_users=10, clock=FakeClock())
    assert ledger.load(path, log) == 1
    assert [user for user, _ in ledger.pop_first_users()] == ["alice"]
    dropped = [c.kwargs for c in sink.calls if c.kwargs.get("event") == "usage_record_dropped"]
    assert len(dropped) == 6


def test_block_list_names_that_would_break_framing_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "blocked.json"
    path.write_text(
        json.dumps(
            {
                "format": "popauth-blocklist",
                "version": 1,
                "users": ["mallory", "eve\nuser=alice", "two words", ""],
            }
        )
    )
    log, sink = capturing_logger()
    assert FileBlockList(path, log).users() == ["mallory"]
    dropped = [c.kwargs for c in sink.calls if c.kwargs.get("event") == "blocklist_record_dropped"]
    assert len(dropped) == 3


def test_damaged_state_files_keep_list_blocked_and_report_framed(tmp_path: Path) -> None:
    """The replies a client sees after a start from hand-edited files."""
    clock = FakeClock()
    now = clock.time()
    (tmp_path / "whitelist.json").write_text(
        snapshot_with(
            [["192.0.2.1", "alice", now, now + 600], ["192.0.2.2", "eve\nx", now, now + 600]]
        )
    )
    (tmp_path / "blocked.json").write_text(
        json.dumps({"format": "popauth-blocklist", "version": 1, "users": ["m", "e\nve"]})
    )
    counts = '"pop_messages":NaN,"pop_recipients":1,"pop_first_seen":1,"pop_last_seen":2,'
    counts += '"auth_messages":0,"auth_recipients":0,"auth_first_seen":0,"auth_last_seen":0'
    (tmp_path / "usage.json").write_text(
        '{"format":"popauth-usage","version":1,"users":{"nan":{' + counts + "}}}"
    )
    log, _ = capturing_logger()
    store = MemoryStore(ttl=900, max_entries=10, clock=clock)
    Snapshotter(store=store, path=tmp_path / "whitelist.json", clock=clock, log=log).restore()
    ledger = UsageLedger(max_users=10, clock=clock)
    ledger.load(tmp_path / "usage.json", log)
    ledger.record("alice", RelayWay.POP_FIRST, messages=1, recipients=1)
    server = IngestServer(
        settings=IngestSettings(socket=tmp_path / "ingest.sock", socket_mode=0o600),
        store=store,
        keying=WhitelistKeying(128),
        peers=PeerPolicy.of([], []),
        blocklist=FileBlockList(tmp_path / "blocked.json", log),
        ledger=ledger,
        metrics=Metrics(),
        log=log,
    )
    server.start()
    try:
        client = IngestClient(str(tmp_path / "ingest.sock"), timeout=5)
        listing = client.request("LIST")
        assert listing[0] == "OK count=1"
        assert listing[1].startswith("address=192.0.2.1 user=alice ")
        assert client.request("BLOCKED") == ["OK count=1", "user=m"]
        report = client.request("REPORT")
        assert report[0] == "OK count=1"
        assert report[1].startswith("user=alice pop_messages=1 ")
        assert client.request("PING") == ["OK pong"]
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("value", "number", "moment", "count"),
    [
        (3, 3.0, 3.0, 3),
        (2.5, 2.5, 2.5, None),
        (-1, -1.0, None, None),
        (0, 0.0, 0.0, 0),
        (True, None, None, None),
        (float("inf"), None, None, None),
        (float("nan"), None, None, None),
        ("3", None, None, None),
        (None, None, None, None),
    ],
)
def test_saved_numbers_are_finite_and_never_booleans(
    value: object, number: float | None, moment: float | None, count: int | None
) -> None:
    assert saved_number(value) == number
    assert saved_time(value) == moment
    assert saved_count(value) == count


def test_a_saved_count_may_ask_for_at_least_one() -> None:
    assert saved_count(0, least=1) is None
    assert saved_count(1, least=1) == 1
