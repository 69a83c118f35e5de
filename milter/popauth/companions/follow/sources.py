"""Where log lines come from: a file followed across rotation, or standard input.

A followed file is polled (no inotify in the standard library; a poll of
``stat`` and ``read`` every ``follow_poll_interval`` costs microseconds).
Rotation is noticed two ways:

- *rename* (logrotate's default, ``create``): the path names a new file.
  What the old file got before the rename is read to its end first, then
  the new file from its start. No line is lost.
- *copytruncate*: the same file shrinks below the position. Reading starts
  again at 0. Lines written after the last poll and before the copy are in
  the copy only: with a poll every 0.1 s that window is small but not
  empty, so prefer rename rotation (see docs/follow.rst).

The log is read a chunk (1 MiB) at a time and the loop handles each
chunk's lines before it reads the next, so a backlog of any size (an ingest
outage, a flood of ``logger`` lines) costs no more memory than a chunk.
A line longer than ``MAX_LINE`` is dropped whole, up to its line break.

The position (device, inode, offset of the first byte of the first line not
yet handled) is kept in a state file, saved after the lines before it have
been reported and acknowledged, so a restart goes on where the last run
stopped and replays nothing. Without a state file the follower starts at the
end of the log.
"""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from popauth.basics.errors import (
    StateFileError,
    StateFileMissing,
    StateWriteError,
    UnavailableError,
)
from popauth.store.statefile import read_json_document, write_json_atomically

STATE_FORMAT = "popauth-follow-position"
STATE_VERSION = 1
# Bytes read per look: a backlog (an ingest outage, a flood of logger lines)
# is read in pieces of this size, so memory does not grow with the log.
READ_CHUNK = 1 << 20
# A line longer than this is dropped whole: no envelope of ours is that
# long (rsyslog's default maximum message is 8 KiB).
MAX_LINE = 16_384
STDIN_WAIT = 0.5


@dataclass(frozen=True, slots=True)
class Position:
    device: int
    inode: int
    offset: int


class LineSplitter:
    """Bytes in, complete lines out, in bounded memory.

    A line longer than ``max_line`` is dropped from its first byte to its
    line break, however the reads cut it: its rest must never be judged as
    a line of its own, with an envelope that only looks like rsyslog's.
    ``on_overlong`` is called once per dropped line.
    """

    def __init__(self, max_line: int, on_overlong: Callable[[], None]) -> None:
        self._max_line = max_line
        self._on_overlong = on_overlong
        self._partial = b""
        # Inside an over-long line: its bytes so far (all dropped).
        self._skipped = 0
        self._skipping = False

    @property
    def unfinished(self) -> int:
        """Bytes fed that belong to the line not yet ended."""
        return self._skipped if self._skipping else len(self._partial)

    def feed(self, data: bytes) -> list[bytes]:
        if self._skipping:
            end = data.find(b"\n")
            if end < 0:
                self._skipped += len(data)
                return []
            self._skipping, self._skipped = False, 0
            data = data[end + 1 :]
        buffer = self._partial + data if self._partial else data
        end = buffer.rfind(b"\n")
        if end < 0:
            lines, rest = [], buffer
        else:
            lines, rest = buffer[:end].split(b"\n"), buffer[end + 1 :]
        if len(rest) > self._max_line:
            self._skipping, self._skipped, rest = True, len(rest), b""
            self._on_overlong()
        self._partial = rest
        kept = [line for line in lines if len(line) <= self._max_line]
        for _ in range(len(lines) - len(kept)):
            self._on_overlong()
        return kept

    def finish(self) -> list[bytes]:
        """The end of the data: an unterminated last line is a line."""
        rest = self._partial
        self.reset()
        return [rest] if rest else []

    def reset(self) -> None:
        self._partial, self._skipped, self._skipping = b"", 0, False


class SourceError(UnavailableError, RuntimeError):
    """The log or the position file cannot be used; the message names the path."""


def _ignore() -> None:
    pass


class LineSource:
    """A source of complete log lines."""

    # True when read_lines() itself waits a little for new lines.
    waits_for_lines = False

    def read_lines(self) -> list[bytes]:
        raise NotImplementedError

    def commit(self) -> None:
        """The lines read so far are handled: remember the position."""

    def close(self) -> None:
        """Release the source (and save the position)."""

    @property
    def exhausted(self) -> bool:
        return False


class FollowedFile(LineSource):
    def __init__(
        self,
        path: Path,
        state_path: Path | None,
        on_overlong: Callable[[], None] = _ignore,
        read_chunk: int = READ_CHUNK,
    ) -> None:
        self.path = path
        self._state_path = state_path
        self._read_chunk = read_chunk
        self._handle: BinaryIO | None = None
        self._identity: tuple[int, int] = (0, 0)
        # Of the next byte to read; the position is that less the unfinished line.
        self._read_offset = 0
        self._lines = LineSplitter(MAX_LINE, on_overlong)
        self._committed: Position | None = None
        self.resumed_from: Position | None = None
        self._open_initial()

    # -- opening ---------------------------------------------------------------

    def _open(self) -> bool:
        try:
            # Unbuffered: each read is one read(2) of at most read_chunk bytes.
            handle = self.path.open("rb", buffering=0)
        except FileNotFoundError:
            return False
        except OSError as error:
            raise SourceError(f"cannot read the log {self.path}: {error.strerror}") from None
        status = os.fstat(handle.fileno())
        if self._handle is not None:
            self._handle.close()
        self._handle = handle
        self._identity = (status.st_dev, status.st_ino)
        self._read_offset = 0
        self._lines.reset()
        return True

    def _open_initial(self) -> None:
        saved = self._load_state()
        if not self._open():
            # Not there yet: the first file to appear is read from its start.
            return
        assert self._handle is not None
        size = os.fstat(self._handle.fileno()).st_size
        if saved is not None and (saved.device, saved.inode) == self._identity:
            # The same file: go on after the last reported line (from 0 if it
            # was truncated since).
            self._read_offset = saved.offset if saved.offset <= size else 0
            self.resumed_from = saved
        elif saved is not None:
            # Rotated while we were stopped: this file began after the rotation.
            self._read_offset = 0
        else:
            self._read_offset = size
        self._handle.seek(self._read_offset)

    def _load_state(self) -> Position | None:
        if self._state_path is None:
            return None
        try:
            document = read_json_document(self._state_path, STATE_FORMAT, STATE_VERSION)
        except StateFileMissing:
            return None
        except StateFileError as error:
            raise StateFileError(f"follow_state_path {self._state_path}: {error}") from None
        try:
            position = Position(
                int(document["device"]), int(document["inode"]), int(document["offset"])
            )
        except (KeyError, TypeError, ValueError):
            raise StateFileError(
                f"follow_state_path {self._state_path}: position fields missing or malformed"
            ) from None
        if document.get("path") != str(self.path):
            # Another log: its position means nothing here.
            return None
        return position

    # -- reading ---------------------------------------------------------------

    def read_lines(self) -> list[bytes]:
        """The lines of a few chunks at most; [] when nothing new was there."""
        if self._handle is None and not self._open():
            return []
        lines, at_end = self._read_chunk_of_lines()
        while not lines and not at_end:
            # A chunk inside an over-long line: nothing kept, read on.
            lines, at_end = self._read_chunk_of_lines()
        if not at_end or not self._rotated():
            return lines
        # Renamed: what the old file got meanwhile first (the rest of it at
        # the next call if that is more than a chunk), its unterminated last
        # line ends with it, then the new file.
        more, at_end = self._read_chunk_of_lines()
        lines += more
        if not at_end:
            return lines
        lines += self._lines.finish()
        if self._open():
            lines += self._read_chunk_of_lines()[0]
        return lines

    def _read_chunk_of_lines(self) -> tuple[list[bytes], bool]:
        """One read's lines, and whether it reached the end of the file."""
        assert self._handle is not None
        if os.fstat(self._handle.fileno()).st_size < self._read_offset:
            # copytruncate: the file was emptied under us.
            self._read_offset = 0
            self._lines.reset()
            self._handle.seek(0)
        chunk = self._handle.read(self._read_chunk)
        if not chunk:
            return [], True
        self._read_offset += len(chunk)
        return self._lines.feed(chunk), len(chunk) < self._read_chunk

    def _rotated(self) -> bool:
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return False  # renamed, the new file not created yet
        return (status.st_dev, status.st_ino) != self._identity

    # -- position --------------------------------------------------------------

    @property
    def position(self) -> Position:
        # The start of the unfinished line: a restart reads it again whole
        # (an over-long one is then dropped again, not judged from its middle).
        return Position(*self._identity, self._read_offset - self._lines.unfinished)

    def commit(self) -> None:
        position = self.position
        if self._state_path is None or position == self._committed:
            return
        document = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "path": str(self.path),
            "device": position.device,
            "inode": position.inode,
            "offset": position.offset,
        }
        try:
            write_json_atomically(self._state_path, document)
        except StateWriteError as error:
            # Its message names the file, or the directory that is wrong.
            raise SourceError(f"follow_state_path: {error.strerror}") from None
        self._committed = position

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class StandardInput(LineSource):
    """``tail -F LOG | popauth follow -``: no position; old lines are refused by time."""

    waits_for_lines = True

    def __init__(
        self, stream: BinaryIO | None = None, on_overlong: Callable[[], None] = _ignore
    ) -> None:
        self._stream = stream if stream is not None else sys.stdin.buffer
        self._fd = self._stream.fileno()
        self._lines = LineSplitter(MAX_LINE, on_overlong)
        self._eof = False

    def read_lines(self) -> list[bytes]:
        # Wait briefly so that the loop can see a stop request, then one
        # read() of what the pipe has.
        ready, _, _ = select.select([self._fd], [], [], STDIN_WAIT)
        if not ready:
            return []
        chunk = os.read(self._fd, READ_CHUNK)
        if not chunk:
            self._eof = True
            return self._lines.finish()
        return self._lines.feed(chunk)

    @property
    def exhausted(self) -> bool:
        return self._eof
