"""Daemons a test run or a bench run started and did not stop.

Every daemon the harness starts lives in a temporary directory of its run:
its configuration, sockets, queue or data directory are there, so its
command line, working directory, root or executable points into it
(Postfix's master runs in its queue directory, Dovecot and popauth name
their configuration files, redis-server its ``--dir``). Once a run has
stopped everything, any process that still points into one of the run's
directories was left behind. :func:`stop_leftovers` ends those, by pid,
and says which they were, so that the run can fail with their names.

:func:`run_directory` is the parent of every temporary directory a test
process makes for daemons (besides pytest's own ``tmp_path`` tree), so that
the check knows them all, and other runs' directories are never touched.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# How long a leftover gets to end on SIGTERM before SIGKILL.
TERMINATE_TIMEOUT = 5.0
_POLL = 0.05


@dataclass(frozen=True)
class Leftover:
    """A process that points into a run's directory, and what pointed there."""

    pid: int
    command: str
    # "cwd", "root", "exe" or "cmdline".
    evidence: str

    def describe(self) -> str:
        return f"pid {self.pid} ({self.evidence}): {self.command[:200]}"


def _pattern(directories: Iterable[Path]) -> re.Pattern[str]:
    # A directory, and nothing that merely starts with its name
    # (/tmp/popauth-bench-ab is not inside /tmp/popauth-bench-a).
    names = "|".join(re.escape(str(directory).rstrip("/")) for directory in directories)
    return re.compile(rf"(?:{names})(?=/|\s|$|\x00|:|,|;|\")")


def _live(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _evidence(pid: int, pattern: re.Pattern[str]) -> tuple[str, str] | None:
    """(what pointed into a directory, the command line) of ``pid``, or None."""
    base = Path("/proc", str(pid))
    try:
        command = (base / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    if not command.strip():
        return None  # a kernel thread, or already gone
    for link in ("cwd", "root", "exe"):
        try:
            target = os.readlink(base / link)
        except OSError:
            continue
        if pattern.match(target.removesuffix(" (deleted)")):
            return link, command.strip()
    if pattern.search(command):
        return "cmdline", command.strip()
    return None


def processes_inside(directories: Sequence[Path]) -> list[Leftover]:
    """Live processes (other than this one) that point into ``directories``."""
    if not directories:
        return []
    pattern = _pattern(directories)
    own = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        pid = int(entry.name)
        evidence = _evidence(pid, pattern)
        if evidence is not None and _live(pid):
            found.append(Leftover(pid, evidence[1], evidence[0]))
    return sorted(found, key=lambda leftover: leftover.pid)


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # ended meanwhile
        os.kill(pid, signum)


def stop_leftovers(directories: Sequence[Path]) -> list[Leftover]:
    """End every process that points into ``directories`` (SIGTERM, then
    SIGKILL); the ones that were there, for the run to report as a failure."""
    leftovers = processes_inside(directories)
    for leftover in leftovers:
        _signal(leftover.pid, signal.SIGTERM)
    deadline = time.monotonic() + TERMINATE_TIMEOUT
    while any(_live(leftover.pid) for leftover in leftovers) and time.monotonic() < deadline:
        time.sleep(_POLL)
    for leftover in leftovers:
        if _live(leftover.pid):
            _signal(leftover.pid, signal.SIGKILL)
    return leftovers


def mounts_inside(directory: Path) -> list[str]:
    """Mount points below ``directory`` (in this process's mount namespace)."""
    prefix = str(directory).rstrip("/") + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        points = [line.split()[4].replace("\\040", " ") for line in mountinfo]
    return [point for point in points if point.startswith(prefix)]


def _remove(directory: Path) -> None:
    # Never through a mount point: a bind mount of /dev would take this
    # machine's device nodes with it. Each test unmounts what it mounted.
    mounted = mounts_inside(directory)
    if mounted:
        print(f"not removing {directory}: still mounted inside: {mounted}", file=sys.stderr)
        return
    shutil.rmtree(directory, ignore_errors=True)


@functools.cache
def run_directory() -> Path:
    """This test process's parent of the temporary directories its daemons use.

    Traversable by other users (Postfix, Dovecot and nobody reach sockets
    inside), removed when the process exits.
    """
    root = Path(tempfile.mkdtemp(prefix="popauth-run-"))
    root.chmod(0o755)
    atexit.register(_remove, root)
    return root


def make_run_directory(prefix: str) -> Path:
    """A new directory under :func:`run_directory`, traversable by other users."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=run_directory()))
    directory.chmod(0o755)
    return directory
