"""A private network namespace for live tests: any number of client addresses.

Only ``lo`` exists inside it, with the documentation addresses a test adds
(2001:db8::/32, 192.0.2.0/24): nothing can leave the machine. A ``sleep``
started with ``unshare -n`` holds the namespace open. ``inside()`` moves the
calling thread into it (setns), so that daemons started there (children
inherit the thread's namespace) and client sockets made there live in it;
popauth itself talks over UNIX sockets and can stay outside.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceError(RuntimeError):
    """The namespace could not be made or entered."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise NamespaceError(f"setns: {os.strerror(error)} (tests need root)")


class NetworkNamespace:
    """A network namespace of its own, held by a sleeping process, with ``addresses`` on lo."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self._holder: subprocess.Popen[bytes] | None = None

    @property
    def path(self) -> Path:
        if self._holder is None:
            raise NamespaceError("namespace not started")
        return Path(f"/proc/{self._holder.pid}/ns/net")

    def start(self) -> None:
        self._holder = subprocess.Popen(
            ["unshare", "--net", "sleep", "infinity"], stdin=subprocess.DEVNULL
        )
        own = os.stat("/proc/self/ns/net").st_ino
        deadline = time.monotonic() + 10
        # unshare has made the namespace once the holder's differs from ours.
        while not self._entered_own_namespace(own):
            if self._holder.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise NamespaceError("unshare --net failed (tests need root)")
            time.sleep(0.01)
        self.run("ip", "link", "set", "lo", "up")
        for address in self.addresses:
            if ":" in address:
                # nodad: usable at once, not "tentative" for a second.
                self.run("ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad")
            else:
                self.run("ip", "addr", "add", f"{address}/32", "dev", "lo")

    def _entered_own_namespace(self, own: int) -> bool:
        try:
            return os.stat(self.path).st_ino != own
        except FileNotFoundError:
            return False

    def run(self, *command: str) -> str:
        """A command inside the namespace; its output, or NamespaceError."""
        result = subprocess.run(
            ["nsenter", f"--net={self.path}", *command],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if result.returncode != 0:
            raise NamespaceError(f"{' '.join(command)}: {result.stderr.strip()}")
        return result.stdout

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Run the block with this thread in the namespace, then come back."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.path, os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(target)
            os.close(home)

    def stop(self) -> None:
        if self._holder is not None:
            self._holder.kill()
            self._holder.wait()
            self._holder = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
