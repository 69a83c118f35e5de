"""A followed file across rename and copytruncate rotation, and its saved position."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from popauth.follow.sources import FollowedFile, StandardInput
from popauth.persistence import StateFileError


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
