"""A followed file across rename and copytruncate rotation, and its saved position."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest

from popauth.basics.errors import StateFileError
from popauth.companions.follow.sources import (
    MAX_LINE,
    READ_CHUNK,
    FollowedFile,
    SourceError,
    StandardInput,
)


def append(path: Path, *lines: str) -> None:
    with path.open("a") as handle:
        handle.write("".join(f"{line}\n" for line in lines))


def test_starts_at_the_end_without_a_saved_position(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    append(log, "old 1", "old 2")
    source = FollowedFile(log, tmp_path / "state.json")
    assert source.read_lines() == []
    append(log, "new 1")
    assert source.read_lines() == [b"new 1"]


def test_an_unfinished_line_waits_for_its_end(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text("")
    source = FollowedFile(log, None)
    with log.open("a") as handle:
        handle.write("half")
    assert source.read_lines() == []
    append(log, " and the rest")
    assert source.read_lines() == [b"half and the rest"]


def test_rename_rotation_reads_the_old_file_to_its_end_then_the_new(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text("")
    source = FollowedFile(log, None)
    append(log, "before")
    assert source.read_lines() == [b"before"]
    append(log, "written just before the rename")
    log.rename(tmp_path / "mail.log.1")
    # Between the rename and the new file: nothing lost, nothing read twice.
    assert source.read_lines() == [b"written just before the rename"]
    append(log, "first of the new file")
    assert source.read_lines() == [b"first of the new file"]


def test_copytruncate_starts_again_at_zero(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text("")
    source = FollowedFile(log, None)
    append(log, "a long line before the rotation")
    assert source.read_lines() == [b"a long line before the rotation"]
    with log.open("r+") as handle:
        handle.truncate(0)
    append(log, "after")
    assert source.read_lines() == [b"after"]


def test_a_restart_goes_on_from_the_committed_position(tmp_path: Path) -> None:
    log, state = tmp_path / "mail.log", tmp_path / "state.json"
    log.write_text("")
    first = FollowedFile(log, state)
    append(log, "one", "two")
    assert first.read_lines() == [b"one", b"two"]
    first.commit()
    append(log, "three")
    first.close()  # stopped before reading "three"
    second = FollowedFile(log, state)
    assert second.resumed_from is not None
    assert second.read_lines() == [b"three"]


def test_an_uncommitted_read_is_read_again_after_a_restart(tmp_path: Path) -> None:
    log, state = tmp_path / "mail.log", tmp_path / "state.json"
    log.write_text("")
    first = FollowedFile(log, state)
    first.commit()
    append(log, "not yet acknowledged")
    assert first.read_lines() == [b"not yet acknowledged"]
    first.close()
    assert FollowedFile(log, state).read_lines() == [b"not yet acknowledged"]


def test_rotated_while_stopped_reads_the_new_file_from_its_start(tmp_path: Path) -> None:
    log, state = tmp_path / "mail.log", tmp_path / "state.json"
    append(log, "old")
    first = FollowedFile(log, state)
    first.commit()
    first.close()
    log.rename(tmp_path / "mail.log.1")
    append(log, "new since the rotation")
    assert FollowedFile(log, state).read_lines() == [b"new since the rotation"]


def test_a_corrupt_state_file_is_an_error(tmp_path: Path) -> None:
    log, state = tmp_path / "mail.log", tmp_path / "state.json"
    log.write_text("")
    state.write_text("{not json")
    with pytest.raises(StateFileError):
        FollowedFile(log, state)


def test_standard_input_reads_lines_until_end_of_file(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"one\ntwo\nthree")
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        source = StandardInput(stream)
        lines = source.read_lines()
        lines += source.read_lines()
        assert lines == [b"one", b"two", b"three"]
        assert source.exhausted


# --- over-long lines: dropped whole, however the reads cut them ---------------

FORGED = b"2026-11-23T09:45:07.020701+00:00 uid=0 pid=1 courierpop3login: LOGIN, user=x"


def test_the_rest_of_an_over_long_line_is_not_a_line(tmp_path: Path) -> None:
    """Once an unfinished line passes MAX_LINE, everything up to its line
    break is dropped: its rest is not judged as a line of its own."""
    log = tmp_path / "mail.log"
    log.write_text("")
    source = FollowedFile(log, None)
    with log.open("ab") as handle:
        handle.write(b"x" * (MAX_LINE + 1))
    assert source.read_lines() == []
    with log.open("ab") as handle:
        handle.write(FORGED + b"\nnext\n")
    assert source.read_lines() == [b"next"]


def test_a_dropped_line_is_told_once(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text("")
    dropped: list[int] = []
    source = FollowedFile(log, None, on_overlong=lambda: dropped.append(1))
    for _ in range(3):
        with log.open("ab") as handle:
            handle.write(b"x" * (MAX_LINE + 1))
        assert source.read_lines() == []
    with log.open("ab") as handle:
        handle.write(b"\nnext\n")
    assert source.read_lines() == [b"next"]
    assert dropped == [1]


def test_an_over_long_line_read_whole_is_dropped_too(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text("")
    dropped: list[int] = []
    source = FollowedFile(log, None, on_overlong=lambda: dropped.append(1))
    append(log, "before", "y" * (MAX_LINE + 1), "z" * MAX_LINE, "after")
    assert source.read_lines() == [b"before", b"z" * MAX_LINE, b"after"]
    assert dropped == [1]


def test_an_over_long_line_across_many_chunks_is_dropped_to_its_end(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text("")
    dropped: list[int] = []
    source = FollowedFile(log, None, on_overlong=lambda: dropped.append(1), read_chunk=4096)
    with log.open("ab") as handle:
        handle.write(b"w" * (10 * MAX_LINE) + b" " + FORGED + b"\n" + b"after\n")
    assert source.read_lines() == [b"after"]
    assert dropped == [1]


def test_a_restart_inside_an_over_long_line_drops_it_again(tmp_path: Path) -> None:
    """The saved position is the start of the unfinished line, never its middle."""
    log, state = tmp_path / "mail.log", tmp_path / "state.json"
    log.write_text("")
    first = FollowedFile(log, state)
    append(log, "one")
    with log.open("ab") as handle:
        handle.write(b"v" * (MAX_LINE + 100))
    assert first.read_lines() == [b"one"]
    first.commit()
    first.close()
    assert first.position.offset == len(b"one\n")
    with log.open("ab") as handle:
        handle.write(b" " + FORGED + b"\ntwo\n")
    assert FollowedFile(log, state).read_lines() == [b"two"]


def test_standard_input_drops_the_rest_of_an_over_long_line() -> None:
    read_end, write_end = os.pipe()
    dropped: list[int] = []
    with os.fdopen(read_end, "rb") as stream:
        source = StandardInput(stream, on_overlong=lambda: dropped.append(1))
        os.write(write_end, b"u" * (MAX_LINE + 1))
        assert source.read_lines() == []
        os.write(write_end, b" " + FORGED + b"\nnext\n")
        os.close(write_end)
        lines = source.read_lines()
        assert lines == [b"next"]
        assert source.read_lines() == []
        assert source.exhausted
    assert dropped == [1]


# --- a backlog is read in bounded pieces --------------------------------------


def test_a_large_backlog_is_read_in_bounded_memory(tmp_path: Path) -> None:
    """A 48 MiB backlog (an ingest outage, a flood of logger lines): the peak
    of what the source allocates stays near one read chunk, not the backlog."""
    log, state = tmp_path / "mail.log", tmp_path / "state.json"
    log.write_text("")
    source = FollowedFile(log, state)
    line = b"2026-11-23T09:45:07.020701+00:00 uid=1000 pid=4242 logger: " + b"f" * 60 + b"\n"
    block = line * (READ_CHUNK // len(line) + 1)
    with log.open("ab") as handle:
        for _ in range(48):
            handle.write(block)
    size = log.stat().st_size
    assert size > 48 * READ_CHUNK
    seen = 0
    tracemalloc.start()
    try:
        while lines := source.read_lines():
            seen += len(lines)
            del lines
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == 48 * (block.count(b"\n"))
    assert source.position.offset == size
    # One chunk of bytes plus its lines as bytes objects: a few MiB.
    assert peak < 8 * READ_CHUNK, peak


def test_rename_rotation_with_more_than_a_chunk_left_in_the_old_file(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text("")
    source = FollowedFile(log, None, read_chunk=64)
    old = [f"old line {number:04}" for number in range(40)]
    append(log, *old)
    log.rename(tmp_path / "mail.log.1")
    append(log, "new line")
    lines: list[bytes] = []
    while more := source.read_lines():
        lines += more
    assert lines == [line.encode() for line in old] + [b"new line"]


# --- errors name the file -------------------------------------------------------


def test_an_unreadable_state_file_is_named(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text("")
    state = log / "state.json"  # through a file: unreadable even for root
    with pytest.raises(StateFileError, match=f"follow_state_path {state}: cannot read"):
        FollowedFile(log, state)


def test_an_unusable_state_directory_is_named(tmp_path: Path) -> None:
    log, directory = tmp_path / "mail.log", tmp_path / "shared"
    log.write_text("")
    directory.mkdir()
    directory.chmod(0o777)  # anyone could replace the position file
    source = FollowedFile(log, directory / "state.json")
    with pytest.raises(SourceError, match=f"follow_state_path: {directory}: writable by group"):
        source.commit()
