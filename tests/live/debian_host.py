"""A whole Debian host for the package tests: systemd as PID 1, on loopback only.

A fresh copy of a cached Debian root (``scripts/debian-root``: debootstrap
with systemd, man-db and the .debs of Postfix, Dovecot and popauth's Python
libraries already downloaded) boots inside its own PID, mount, network and
UTS namespaces, as Debian's autopkgtest boots a throwaway machine. Its
systemd runs in a cgroup2 hierarchy of its own (this machine's cgroups are
v1). Commands run inside with ``nsenter``; the host has loopback only, and
apt installs from the root's own cache, so nothing inside reaches a network.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.live.netns import CLONE_NEWNET, NamespaceError, _libc

REPO = Path(__file__).resolve().parents[2]
CGROUP2 = Path("/run/popauth-tests/cgroup2")
HOSTNAME = "mx.example.test"
# A clean environment inside: nothing of this machine's (its PATH, a venv).
INSIDE_ENV = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "HOME=/root", "TERM=dumb")

UNSHARE = ("unshare", "--pid", "--fork", "--mount", "--net", "--uts", "--ipc")
BOOT = """
set -e
echo $$ > {cgroup}/cgroup.procs
mount --make-rprivate /
mount --bind {root} {root}
mount -t proc proc {root}/proc
mount -t sysfs sysfs {root}/sys
mount --bind {cgroup} {root}/sys/fs/cgroup
mount -t tmpfs tmpfs {root}/run
mount -t tmpfs tmpfs {root}/tmp
mount --rbind /dev {root}/dev
hostname {hostname}
exec chroot {root} /usr/bin/env -i container=docker {path} /lib/systemd/systemd \
    --log-target=console
"""


def _enter(descriptor: int) -> None:
    if _libc.setns(descriptor, CLONE_NEWNET) != 0:
        raise NamespaceError("setns into the host's network namespace failed")


class HostError(RuntimeError):
    """The Debian host could not be made, booted or stopped."""


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


def _cgroup2() -> Path:
    """This machine's cgroup2 hierarchy for booted hosts, mounted once."""
    CGROUP2.mkdir(parents=True, exist_ok=True)
    if not (CGROUP2 / "cgroup.procs").exists():
        subprocess.run(["mount", "-t", "cgroup2", "none", str(CGROUP2)], check=True)
    return CGROUP2


def _remove_cgroup(directory: Path) -> None:
    """Remove a cgroup and the ones systemd made inside it, deepest first."""
    if not directory.exists():
        return
    for path, _, _ in sorted(os.walk(directory), key=lambda entry: -entry[0].count("/")):
        with contextlib.suppress(OSError):
            os.rmdir(path)


class DebianHost:
    """One booted Debian ``release`` (bookworm, trixie), deleted at ``stop``."""

    def __init__(self, release: str) -> None:
        self.release = release
        self.work = Path(tempfile.mkdtemp(prefix=f"popauth-host-{release}-"))
        self.root = self.work / "root"
        self.cgroup = _cgroup2() / self.work.name
        self._booter: subprocess.Popen[bytes] | None = None
        self._console = self.work / "console.log"
        self.pid = 0

    # --- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        tarball = cached_root(self.release)
        self.root.mkdir()
        subprocess.run(["tar", "-C", str(self.root), "-xf", str(tarball)], check=True)
        (self.root / "etc" / "hostname").write_text(f"{HOSTNAME}\n")
        (self.root / "etc" / "hosts").write_text(
            f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME} mx\n::1 localhost\n"
        )
        (self.root / "etc" / "mailname").write_text(f"{HOSTNAME}\n")
        # The operator's "yes" to apt's question, as no one is at a terminal here.
        (self.root / "etc" / "apt" / "apt.conf.d" / "90popauth-test").write_text(
            'APT::Get::Assume-Yes "true";\n'
        )
        self.cgroup.mkdir()
        script = BOOT.format(
            root=shlex.quote(str(self.root)),
            cgroup=shlex.quote(str(self.cgroup)),
            hostname=HOSTNAME,
            path=INSIDE_ENV[0],
        )
        with self._console.open("wb") as console:
            self._booter = subprocess.Popen(
                [*UNSHARE, "/bin/sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        self.pid = self._systemd_pid(deadline)
        while True:
            state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline or self._booter.poll() is not None:
                raise HostError(
                    f"the {self.release} host did not boot (state {state!r}); console:\n"
                    + self.console()[-3000:]
                )
            time.sleep(0.2)

    def _systemd_pid(self, deadline: float) -> int:
        """The pid, as this machine sees it, of the host's PID 1 once it is systemd."""
        assert self._booter is not None
        children = Path(f"/proc/{self._booter.pid}/task/{self._booter.pid}/children")
        while time.monotonic() < deadline and self._booter.poll() is None:
            with contextlib.suppress(OSError):
                for word in children.read_text().split():
                    comm = Path(f"/proc/{word}/comm").read_text().strip()
                    if comm == "systemd":
                        return int(word)
            time.sleep(0.05)
        raise HostError(f"no systemd started for {self.release}; console:\n{self.console()}")

    def console(self) -> str:
        return self._console.read_text(errors="replace") if self._console.exists() else ""

    def stop(self) -> None:
        """Power off (SIGRTMIN+4), then delete the root: nothing is left mounted."""
        if self._booter is not None and self._booter.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGRTMIN + 4)
            try:
                self._booter.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self._booter.pid, signal.SIGKILL)
                self._booter.wait(timeout=10)
        _remove_cgroup(self.cgroup)
        # The mounts lived in the host's own mount namespace and died with it.
        mounts = Path("/proc/mounts").read_text().split("\n")
        if any(f" {self.root}/" in line or f" {self.root} " in line for line in mounts):
            raise HostError(f"{self.root} still has mounts; not deleted")
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.work)], check=True)

    # --- inside --------------------------------------------------------------

    def run(
        self,
        command: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120.0,
        env: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside the host, as root, in its namespaces and root."""
        argv = ["nsenter", "-t", str(self.pid), "-m", "-p", "-n", "-u", "-i", "-r", "-w"]
        argv += ["/usr/bin/env", "-i", *INSIDE_ENV, *env, *command]
        done = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise HostError(
                f"{shlex.join(command)} exited {done.returncode} on {self.release}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def sh(self, script: str, **options: object) -> subprocess.CompletedProcess[str]:
        return self.run(["/bin/sh", "-ec", script], **options)  # type: ignore[arg-type]

    def add_addresses(self, *addresses: str) -> None:
        """More addresses on the host's loopback: clients that are not 127.x."""
        for address in addresses:
            subprocess.run(
                [
                    "nsenter",
                    "-t",
                    str(self.pid),
                    "-n",
                    "ip",
                    "addr",
                    "add",
                    f"{address}/32",
                    "dev",
                    "lo",
                ],
                check=True,
            )

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

    def main_pid(self, unit: str) -> int:
        shown = self.run(["systemctl", "show", "-p", "MainPID", "--value", unit]).stdout
        return int(shown.strip() or 0)

    def unit_property(self, unit: str, name: str) -> str:
        return self.run(["systemctl", "show", "-p", name, "--value", unit]).stdout.strip()

    def documentation_paths(self, unit: str) -> list[str]:
        shown = self.unit_property(unit, "Documentation")
        return re.findall(r"file://(\S+)", shown)

    def put(self, source: Path, inside: str) -> None:
        """Copy a file of this machine to ``inside`` (a path under the host's /root)."""
        target = self.root / inside.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
