"""A private PID namespace (with a network namespace) whose pids come round quickly.

A holder process (``unshare -p -n -f --kill-child sleep infinity``) keeps the
namespaces; commands join them with ``nsenter``. This kernel keeps
``pid_max`` per PID namespace, so a small one (1000) makes the kernel hand a
pid out again after a few hundred forks, as a busy host does after many
thousands: the pid reuse an attacker waits for, in a second. The first 300
pids are never handed out twice (the kernel's RESERVED_PIDS), so a pid to be
reused must be placed above them (``set_last_pid``).

When the holder stops, the kernel kills every process in the namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

START_TIMEOUT = 10.0


class PidNamespaceError(RuntimeError):
    """The namespace could not be made or set up; the message says what failed."""


class PidNamespace:
    def __init__(self, pid_max: int = 1000) -> None:
        self.pid_max = pid_max
        self.holder: subprocess.Popen[bytes] | None = None
        self.init_pid = 0

    def start(self) -> PidNamespace:
        self.holder = subprocess.Popen(
            ["unshare", "-p", "-n", "-f", "--kill-child", "sleep", "infinity"],
            start_new_session=True,
        )
        children = Path(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children")
        deadline = time.monotonic() + START_TIMEOUT
        while not (children.exists() and children.read_text().split()):
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise PidNamespaceError("unshare -p -n did not start its namespace")
            time.sleep(0.01)
        self.init_pid = int(children.read_text().split()[0])
        self.run(["ip", "link", "set", "lo", "up"], pid=False, net=True)
        self.run(["sh", "-c", f"echo {self.pid_max} > /proc/sys/kernel/pid_max"])
        return self

    def enter(self, argv: list[str], *, pid: bool = True, net: bool = False) -> list[str]:
        """``argv`` inside the namespace: its PID namespace, and/or its network."""
        flags = [*(["-p"] if pid else []), *(["-n"] if net else [])]
        return ["nsenter", "-t", str(self.init_pid), *flags, "--", *argv]

    def run(
        self, argv: list[str], *, pid: bool = True, net: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.enter(argv, pid=pid, net=net),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise PidNamespaceError(f"{argv} failed in the namespace:\n{result.stderr}")
        return result

    def set_last_pid(self, pid: int) -> None:
        """The next process made in the namespace gets ``pid + 1`` (or near it)."""
        self.run(["sh", "-c", f"echo {pid} > /proc/sys/kernel/ns_last_pid"])

    def host_pid(self, pid: int) -> int | None:
        """The pid this machine knows the namespace's process ``pid`` by; None if gone."""
        namespace = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "pid") != namespace:
                    continue
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("NSpid:") and line.split()[-1] == str(pid):
                        return int(entry.name)
        return None

    def stop(self) -> None:
        if self.holder is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.holder.pid, signal.SIGKILL)
        self.holder.wait(10)
        self.holder = None
