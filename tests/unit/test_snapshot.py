from __future__ import annotations

import json
import stat
from collections.abc import Iterable
from pathlib import Path

import pytest

from popauth.basics.addresses import parse_client_address
from popauth.basics.errors import StateFileError
from popauth.store.base import Grant
from popauth.store.memory import MemoryStore
from popauth.store.pacing import CHUNK
from popauth.store.snapshot import Snapshotter, write_snapshot
from tests.support.clock import FakeClock
from tests.support.logs import capturing_logger

A = parse_client_address("192.0.2.1")
B = parse_client_address("2001:db8::")


class RecordingStore(MemoryStore):
    """A store that keeps the grants a restore hands it, expired ones included."""

    def __init__(self) -> None:
        super().__init__(ttl=900, max_entries=10, clock=FakeClock())
        self.handed: list[Grant] | None = None

    def restore(self, grants: Iterable[Grant]) -> int:
        self.handed = list(grants)
        return len(self.handed)


def read_snapshot(path: Path) -> list[Grant]:
    """What restoring the snapshot at ``path`` hands the store; StateFileError if none."""
    log, sink = capturing_logger()
    store = RecordingStore()
    Snapshotter(store=store, path=path, clock=FakeClock(), log=log).restore()
    if store.handed is None:
        (refused,) = [c for c in sink.calls if c.kwargs.get("event") == "snapshot_not_restored"]
        raise StateFileError(refused.kwargs["reason"])
    return store.handed


def test_round_trip_is_private_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state" / "whitelist.json"
    grants = [Grant(A, "alice", 100.0, 1000.0), Grant(B, "bob@example.org", 200.5, 1100.5)]
    assert write_snapshot(path, grants, saved_at=300.0) == 2
    assert read_snapshot(path) == grants
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["whitelist.json"]


def test_rewrite_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "whitelist.json"
    write_snapshot(path, [Grant(A, "alice", 1.0, 2.0)], saved_at=1.0)
    write_snapshot(path, [], saved_at=2.0)
    assert read_snapshot(path) == []


def test_a_snapshot_written_in_chunks_is_one_json_document(tmp_path: Path) -> None:
    path = tmp_path / "whitelist.json"
    grants = [
        Grant(parse_client_address(f"10.0.{n // 256}.{n % 256}"), f"u{n}", n + 0.5, n + 900.5)
        for n in range(CHUNK * 2 + 3)
    ]
    assert write_snapshot(path, iter(grants), saved_at=7.0) == len(grants)
    document = json.loads(path.read_bytes())
    assert document["saved_at"] == 7.0
    assert len(document["entries"]) == len(grants)
    assert read_snapshot(path) == grants


def test_a_snapshot_that_cannot_be_encoded_leaves_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "whitelist.json"
    write_snapshot(path, [Grant(A, "alice", 1.0, 2.0)], saved_at=1.0)
    with pytest.raises(ValueError):
        write_snapshot(path, [Grant(A, "alice", 1.0, float("nan"))], saved_at=2.0)
    assert read_snapshot(path) == [Grant(A, "alice", 1.0, 2.0)]
    assert [p.name for p in tmp_path.iterdir()] == ["whitelist.json"]


GOOD = {"format": "popauth-whitelist", "version": 1, "saved_at": 1.0}


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "no such file"),
        (b"", "truncated or corrupt"),
        (json.dumps({**GOOD, "entries": []}).encode()[:-5], "truncated or corrupt"),
        (b"\x00\xff\x13garbage", "truncated or corrupt"),
        (json.dumps({"format": "something-else", "entries": []}).encode(), "not a popauth"),
        (json.dumps([1, 2, 3]).encode(), "not a popauth"),
        (json.dumps({**GOOD, "version": 99, "entries": []}).encode(), "unsupported"),
        (json.dumps({**GOOD, "entries": {}}).encode(), "no entry list"),
    ],
)
def test_unusable_files(tmp_path: Path, content: bytes | None, reason: str) -> None:
    path = tmp_path / "whitelist.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(StateFileError, match=reason):
        read_snapshot(path)


@pytest.mark.parametrize(
    "entry",
    [
        ["192.0.2.1", "a", 1],
        ["not-ip", "a", 1, 2],
        ["192.0.2.1", 5, 1, 2],
        ["192.0.2.1", "a", "x", 2],
    ],
)
def test_malformed_entries_are_dropped_not_restored(tmp_path: Path, entry: list[object]) -> None:
    path = tmp_path / "whitelist.json"
    good = ["192.0.2.9", "alice", 1, 2]
    path.write_text(json.dumps({**GOOD, "entries": [entry, good]}))
    assert [grant.user for grant in read_snapshot(path)] == ["alice"]


def test_restore_keeps_expiry_and_drops_expired() -> None:
    clock = FakeClock()
    now = clock.time()
    store = MemoryStore(ttl=900, max_entries=10, clock=clock)
    restored = store.restore(
        [
            Grant(A, "alice", now - 300, now + 600),
            Grant(B, "bob", now - 1000, now - 100),
            Grant(parse_client_address("192.0.2.9"), "carol", now - 10, now + 5000),
        ]
    )
    assert restored == 2
    alice = store.lookup(A)
    assert alice is not None
    assert alice.expires_at == pytest.approx(now + 600)
    assert store.lookup(B) is None
    # No entry outlives the TTL in force now.
    carol = store.lookup(parse_client_address("192.0.2.9"))
    assert carol is not None
    assert carol.expires_at == pytest.approx(now + 900)
    clock.advance(599)
    assert store.lookup(A) is not None
    clock.advance(1)
    assert store.lookup(A) is None
    # The store keeps working normally after a restore.
    store.grant(A, "alice")
    clock.advance(899)
    assert store.lookup(A) is not None


def test_snapshotter_restores_and_saves(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "whitelist.json"
    log, sink = capturing_logger()
    first = MemoryStore(ttl=900, max_entries=10, clock=clock)
    first.grant(A, "alice")
    Snapshotter(store=first, path=path, clock=clock, log=log).save()
    clock.advance(100)
    second = MemoryStore(ttl=900, max_entries=10, clock=clock)
    Snapshotter(store=second, path=path, clock=clock, log=log).restore()
    grant = second.lookup(A)
    assert grant is not None
    assert grant.expires_at == pytest.approx(clock.time() + 800)
    # Entries from an earlier run are worth a warning: how many, and from where.
    (restored,) = [c for c in sink.calls if c.kwargs.get("event") == "snapshot_restored"]
    assert restored.method_name == "warning"
    assert (restored.kwargs["restored"], restored.kwargs["path"]) == (1, str(path))
    path.write_text("{")
    third = MemoryStore(ttl=900, max_entries=10, clock=clock)
    Snapshotter(store=third, path=path, clock=clock, log=log).restore()
    assert third.stats().entries == 0
    errors = [c for c in sink.calls if c.kwargs.get("event") == "snapshot_not_restored"]
    assert errors[-1].method_name == "error"
    assert "corrupt" in errors[-1].kwargs["reason"]


OLD_FORMAT = Path(__file__).parents[1] / "support" / "snapshots" / "whitelist-v1.json"


def test_a_snapshot_of_the_one_user_format_still_loads(tmp_path: Path) -> None:
    """Version 1 (earlier releases, one row per address) restores as one user each."""
    clock = FakeClock()  # 1800000000: every entry of the file is live
    assert json.loads(OLD_FORMAT.read_text())["version"] == 1
    store = MemoryStore(ttl=900, max_entries=10, clock=clock)
    log, sink = capturing_logger()
    path = tmp_path / "whitelist.json"
    path.write_bytes(OLD_FORMAT.read_bytes())
    path.chmod(0o600)
    Snapshotter(store=store, path=path, clock=clock, log=log).restore()
    alice = store.lookup(A)
    assert alice is not None
    assert (alice.users, alice.expires_at) == (("alice",), 1800000600.0)
    bob = store.lookup(B)
    assert bob is not None
    assert bob.users == ("bob",)
    anonymous = store.lookup(parse_client_address("198.51.100.7"))
    assert anonymous is not None
    assert anonymous.users == ("",)  # a login reported without a user name
    assert store.stats().entries == 3
    (restored,) = [c for c in sink.calls if c.kwargs.get("event") == "snapshot_restored"]
    assert restored.kwargs["restored"] == 3
    # Saved again, it is version 2.
    Snapshotter(store=store, path=path, clock=clock, log=log).save()
    assert json.loads(path.read_text())["version"] == 2


def test_every_user_of_an_entry_survives_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "whitelist.json"
    log, _ = capturing_logger()
    first = MemoryStore(ttl=900, max_entries=10, clock=clock)
    first.grant(A, "alice")
    clock.advance(100)
    first.grant(A, "bob")
    first.grant(B, "carol")
    Snapshotter(store=first, path=path, clock=clock, log=log).save()
    rows = json.loads(path.read_text())["entries"]
    assert [row[:2] for row in rows] == [[str(A), "alice"], [str(A), "bob"], [str(B), "carol"]]
    clock.advance(100)
    second = MemoryStore(ttl=900, max_entries=10, clock=clock)
    Snapshotter(store=second, path=path, clock=clock, log=log).restore()
    found = second.lookup(A)
    assert found is not None
    assert found.users == ("alice", "bob")
    assert [g.expires_at - clock.time() for g in found.grants] == pytest.approx([700, 800])
    clock.advance(750)  # alice's membership is over, bob's is not
    found = second.lookup(A)
    assert found is not None
    assert found.users == ("bob",)
    clock.advance(100)
    assert second.lookup(A) is None
