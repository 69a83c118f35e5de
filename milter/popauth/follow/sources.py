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

The position (device, inode, offset of the next unread byte) is kept in a
state file, saved after the lines before it have been reported and
acknowledged, so a restart goes on where the last run stopped and replays
nothing. Without a state file the follower starts at the end of the log.
"""

from __future__ import annotations

import os
import select
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from popauth.persistence import StateFileError, read_json_document, write_json_atomically

STATE_FORMAT = "popauth-follow-position"
STATE_VERSION = 1
READ_CHUNK = 1 << 20
# A line longer than this is cut into pieces that match nothing.
MAX_LINE = 16_384
STDIN_WAIT = 0.5


@dataclass(frozen=True, slots=True)
class Position:
    device: int
    inode: int
    offset: int


def _split(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines, and the unfinished rest (kept for the next read)."""
    end = buffer.rfind(b"\n")
    if end < 0:
        if len(buffer) > MAX_LINE:
            return [buffer], b""
        return [], buffer
    return buffer[:end].split(b"\n"), buffer[end + 1 :]


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
    def __init__(self, path: Path, state_path: Path | None) -> None:
        self.path = path
        self._state_path = state_path
        self._handle: BinaryIO | None = None
        self._identity: tuple[int, int] = (0, 0)
        self._offset = 0  # of the first byte of self._partial
        self._partial = b""
        self._committed: Position | None = None
        self.resumed_from: Position | None = None
        self._open_initial()

    # -- opening ---------------------------------------------------------------

    def _open(self) -> bool:
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return False
        status = os.fstat(handle.fileno())
        if self._handle is not None:
            self._handle.close()
        self._handle = handle
        self._identity = (status.st_dev, status.st_ino)
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
            self._offset = saved.offset if saved.offset <= size else 0
            self.resumed_from = saved
        elif saved is not None:
            # Rotated while we were stopped: this file began after the rotation.
            self._offset = 0
        else:
            self._offset = size
        self._handle.seek(self._offset)

    def _load_state(self) -> Position | None:
        if self._state_path is None:
            return None
        try:
            document = read_json_document(self._state_path, STATE_FORMAT, STATE_VERSION)
        except StateFileError as error:
            if str(error) == "no such file":
                return None
            raise
        try:
            position = Position(
                int(document["device"]), int(document["inode"]), int(document["offset"])
            )
        except (KeyError, TypeError, ValueError):
            raise StateFileError("position fields missing or malformed") from None
        if document.get("path") != str(self.path):
            # Another log: its position means nothing here.
            return None
        return position

    # -- reading ---------------------------------------------------------------

    def read_lines(self) -> list[bytes]:
        if self._handle is None:
            if not self._open():
                return []
            self._offset = 0
        lines = self._read_available()
        rotated = self._rotated()
        if rotated:
            # What the old file got before the rename, then the new file.
            lines += self._read_available()
            if self._partial:
                lines.append(self._partial)  # the old file's unterminated last line
                self._partial = b""
            if self._open():
                self._offset = 0
            lines += self._read_available()
        return lines

    def _read_available(self) -> list[bytes]:
        assert self._handle is not None
        size = os.fstat(self._handle.fileno()).st_size
        end_of_data = self._offset + len(self._partial)
        if size < end_of_data:
            # copytruncate: the file was emptied under us.
            self._offset, self._partial = 0, b""
            self._handle.seek(0)
        chunks = [self._partial]
        while True:
            chunk = self._handle.read(READ_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        lines, self._partial = _split(data)
        self._offset += len(data) - len(self._partial)
        return lines

    def _rotated(self) -> bool:
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return False  # renamed, the new file not created yet
        return (status.st_dev, status.st_ino) != self._identity

    # -- position --------------------------------------------------------------

    @property
    def position(self) -> Position:
        return Position(*self._identity, self._offset)

    def commit(self) -> None:
        position = self.position
        if self._state_path is None or position == self._committed:
            return
        write_json_atomically(
            self._state_path,
            {
                "format": STATE_FORMAT,
                "version": STATE_VERSION,
                "path": str(self.path),
                "device": position.device,
                "inode": position.inode,
                "offset": position.offset,
            },
        )
        self._committed = position

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class StandardInput(LineSource):
    """``tail -F LOG | popauth follow -``: no position; old lines are refused by time."""

    waits_for_lines = True

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdin.buffer
        self._fd = self._stream.fileno()
        self._partial = b""
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
            rest, self._partial = self._partial, b""
            return [rest] if rest else []
        lines, self._partial = _split(self._partial + chunk)
        return lines

    @property
    def exhausted(self) -> bool:
        return self._eof
