"""A whole Debian host for the package tests: systemd as PID 1, on loopback only.

A fresh copy of a cached Debian root (``scripts/debian-root``: debootstrap
with systemd, man-db and the .debs of Postfix, Dovecot and popauth's Python
libraries already downloaded) boots as tests/live/systemd_host.py boots
every host: inside its own PID, mount, network and UTS namespaces, as
Debian's autopkgtest boots a throwaway machine. apt installs from the
root's own cache, so nothing inside reaches a network.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.live.netns import CLONE_NEWNET, NamespaceError, _libc
from tests.live.systemd_host import HOSTNAME, HostError, SystemdHost

REPO = Path(__file__).resolve().parents[2]

__all__ = ["HOSTNAME", "REPO", "DebianHost", "HostError", "cached_root"]


def _enter(descriptor: int) -> None:
    if _libc.setns(descriptor, CLONE_NEWNET) != 0:
        raise NamespaceError("setns into the host's network namespace failed")


def cached_root(release: str) -> Path:
    """The tarball of ``release``'s root, built once by scripts/debian-root."""
    made = subprocess.run(
        [str(REPO / "scripts" / "debian-root"), release],
        capture_output=True,
        text=True,
        check=False,
        timeout=1200,
    )
    if made.returncode != 0:
        raise HostError(f"scripts/debian-root {release} failed: {made.stderr.strip()[-2000:]}")
    return Path(made.stdout.strip().splitlines()[-1])


class DebianHost(SystemdHost):
    """One booted Debian ``release`` (bookworm, trixie) with the package's root."""

    def _tarball(self) -> Path:
        return cached_root(self.release)

    def _prepare_root(self) -> None:
        (self.root / "etc" / "hostname").write_text(f"{HOSTNAME}\n")
        (self.root / "etc" / "hosts").write_text(
            f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME} mx\n::1 localhost\n"
        )
        (self.root / "etc" / "mailname").write_text(f"{HOSTNAME}\n")
        # The operator's "yes" to apt's question, as no one is at a terminal here.
        (self.root / "etc" / "apt" / "apt.conf.d" / "90popauth-test").write_text(
            'APT::Get::Assume-Yes "true";\n'
        )

    def add_addresses(self, *addresses: str) -> None:
        """More addresses on the host's loopback: clients that are not 127.x."""
        enter = ("nsenter", "-t", str(self.pid), "-n")
        for address in addresses:
            subprocess.run([*enter, "ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True)

    @contextlib.contextmanager
    def network(self) -> Iterator[None]:
        """Run the block with this thread in the host's network namespace (its loopback)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY)
        try:
            _enter(target)
            try:
                yield
            finally:
                _enter(home)
        finally:
            os.close(target)
            os.close(home)

    def journal(self, *arguments: str) -> str:
        return self.run(["journalctl", "--no-pager", "-o", "cat", *arguments]).stdout

    def unit_property(self, unit: str, name: str) -> str:
        return self.run(["systemctl", "show", "-p", name, "--value", unit]).stdout.strip()

    def documentation_paths(self, unit: str) -> list[str]:
        shown = self.unit_property(unit, "Documentation")
        return re.findall(r"file://(\S+)", shown)

    def put(self, source: Path, inside: str) -> None:
        """Copy a file of this machine to ``inside`` (a path under the host's /root)."""
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
