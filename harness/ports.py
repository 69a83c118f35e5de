"""Small helpers of the harness: ports, readiness, processes, log files.

Readiness is always polled against a deadline; nothing here sleeps a guessed time.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

POLL_INTERVAL = 0.02


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago.

    The kernel picks it (bind to port 0); there is a small race until the daemon
    binds it, which is acceptable for tests.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def read_banner(host: str, port: int, timeout: float = 2.0) -> bytes | None:
    """Connect once and return the first line the server sends, or None."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(512)
                if not chunk:
                    break
                data += chunk
            if data:
                sock.sendall(b"QUIT\r\n")  # SMTP and POP3 both: keeps logs clean
            return data or None
    except OSError:
        return None


def wait_for_banner(host: str, port: int, prefix: bytes, deadline: float) -> bool:
    """Poll until a connection to ``host:port`` greets with ``prefix``.

    ``deadline`` is an absolute ``time.monotonic()`` value. Returns False when it
    passes without a matching banner.
    """
    while True:
        banner = read_banner(host, port, timeout=max(0.1, deadline - time.monotonic()))
        if banner is not None and banner.startswith(prefix):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)


def wait_for_port(host: str, port: int, deadline: float) -> bool:
    """Poll until ``host:port`` accepts a TCP connection (absolute monotonic deadline)."""
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie.

    Daemonised masters (postfix, dovecot) are re-parented to PID 1, which in
    some containers never reaps them: a zombie counts as gone.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return fields[0] not in ("Z", "X")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def wait_group_gone(pgid: int, deadline: float) -> bool:
    """Poll until process group ``pgid`` has no live member (monotonic deadline)."""
    while group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


def wait_pid_gone(pid: int, deadline: float) -> bool:
    """Poll until ``pid`` is gone (absolute monotonic deadline)."""
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


def grant_traversal(path: Path) -> None:
    """Add o+x to ``path`` and every ancestor directory.

    Daemons that drop privileges (Postfix smtpd as ``postfix`` connecting to a
    milter socket, Dovecot's ``dovecot``/``dovenull``/mail users) must be able to
    walk absolute paths below pytest's 0700 temporary directories. Execute
    permission only lets them pass through by name, not list the directories.
    """
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(directory, stat.S_IMODE(mode) | stat.S_IXOTH)


def log_tail(path: Path, lines: int = 40) -> str:
    """Return the last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def read_log(path: Path) -> str:
    """A log file's text so far ('' before the daemon wrote anything)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
