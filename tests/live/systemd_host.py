"""A Debian host with systemd as PID 1 (and journald), booted in namespaces, for host tests.

Some behaviour exists only on a whole host: journald in front of rsyslog,
units with their sandboxing, services started by systemd. This boots one,
as the project's field guide describes (section 7):

- a root made once by ``debootstrap --variant=minbase`` with systemd and
  the packages a test asks for, kept as a tarball under
  ``/var/cache/popauth-tests/`` (about 3 minutes to build; delete the
  tarball to rebuild it), unpacked fresh for each host;
- booted as the first process of new PID, mount, network, UTS and IPC
  namespaces, in a cgroup of a cgroup2 hierarchy of its own (this
  machine's cgroups are v1), with ``/`` of the root bind-mounted onto
  itself (mount sandboxing of units needs ``/`` to be a mount point);
- loopback only inside; commands run there with ``nsenter``; files are
  read and written from outside through ``host.root``;
- ``/proc/kmsg`` is ``/dev/null``: the kernel's log is this machine's, and
  a syslog daemon inside (imklog) must not take its messages from others.

``stop()`` powers it off (SIGRTMIN+4), removes its cgroup and deletes the
root; every mount lived in the host's own mount namespace and went with it.

Usage::

    host = SystemdHost(packages=("rsyslog",)).start()
    try:
        host.run(["systemctl", "is-active", "rsyslog"])
    finally:
        host.stop()
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

CACHE = Path(os.environ.get("POPAUTH_HOST_CACHE", "/var/cache/popauth-tests"))
CGROUP2 = Path("/run/popauth-tests/cgroup2")
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "ca-certificates")
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
mount --bind /dev/null {root}/proc/kmsg
mount -t sysfs sysfs {root}/sys
mount --bind {cgroup} {root}/sys/fs/cgroup
mount -t tmpfs tmpfs {root}/run
mount -t tmpfs tmpfs {root}/tmp
mount --rbind /dev {root}/dev
hostname {hostname}
exec chroot {root} /usr/bin/env -i container=docker {path} /lib/systemd/systemd \
    --log-target=console
"""


class HostError(RuntimeError):
    """The host could not be built, booted, used or stopped; the message says why."""


def root_tarball(release: str = "bookworm", packages: Sequence[str] = ()) -> Path:
    """The cached root of ``release`` with systemd and ``packages`` installed; built once."""
    wanted = sorted({*BASE_PACKAGES, *packages})
    key = hashlib.sha256(" ".join([release, *wanted]).encode()).hexdigest()[:16]
    tarball = CACHE / f"systemd-host-{release}-{key}.tar"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f".systemd-host-{release}-{key}.lock").open("w") as lock:
        # Another test process may be building the same root: wait for it.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not tarball.exists():
            _build(release, wanted, tarball)
    return tarball


def debian_mirror() -> str:
    """The Debian archive this machine's apt uses (scripts/debian-mirror)."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "debian-mirror"
    found = subprocess.run([str(script)], capture_output=True, text=True, check=False)
    if found.returncode != 0:
        raise HostError(found.stderr.strip())
    return found.stdout.strip()


def _build(release: str, packages: list[str], tarball: Path) -> None:
    if shutil.which("debootstrap") is None:
        raise HostError("debootstrap is missing: apt-get install debootstrap")
    work = Path(tempfile.mkdtemp(prefix=f"build-{release}.", dir=CACHE))
    root = work / "root"
    try:
        built = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(packages)}",
                release,
                str(root),
                debian_mirror(),
            ],
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if built.returncode != 0:
            raise HostError(
                f"debootstrap {release} failed (network?):\n{built.stdout[-3000:]}{built.stderr}"
            )
        certificates = Path("/etc/ssl/certs/ca-certificates.crt")
        if certificates.exists():
            shutil.copy(certificates, root / "etc/ssl/certs/ca-certificates.crt")
        for deb in (root / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        partial = tarball.with_suffix(".tar.partial")
        subprocess.run(
            ["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], check=True
        )
        partial.rename(tarball)
    finally:
        _delete(work)


def _delete(directory: Path) -> None:
    """Delete a directory tree only if nothing is mounted in it (never through /dev)."""
    mounts = Path("/proc/mounts").read_text().splitlines()
    if any(f" {directory}/" in line for line in mounts):
        raise HostError(f"{directory} still has mounts; not deleted")
    subprocess.run(["rm", "-rf", "--one-file-system", str(directory)], check=True)


def _cgroup2() -> Path:
    """This machine's cgroup2 hierarchy for booted hosts, mounted once."""
    CGROUP2.mkdir(parents=True, exist_ok=True)
    if not (CGROUP2 / "cgroup.procs").exists():
        subprocess.run(["mount", "-t", "cgroup2", "none", str(CGROUP2)], check=True)
    return CGROUP2


def _remove_cgroup(directory: Path) -> None:
    """Remove a cgroup and those systemd made inside it, deepest first."""
    if not directory.exists():
        return
    for path, _, _ in sorted(os.walk(directory), key=lambda entry: -entry[0].count("/")):
        with contextlib.suppress(OSError):
            os.rmdir(path)


class SystemdHost:
    """One booted Debian ``release`` with ``packages``; deleted by ``stop``."""

    def __init__(self, release: str = "bookworm", packages: Sequence[str] = ()) -> None:
        self.release = release
        self.packages = tuple(packages)
        self.work = Path(tempfile.mkdtemp(prefix=f"popauth-host-{release}-"))
        self.root = self.work / "root"
        self.cgroup = _cgroup2() / self.work.name
        self.console_path = self.work / "console.log"
        self._booter: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def start(self, timeout: float = 90.0) -> SystemdHost:
        tarball = root_tarball(self.release, self.packages)
        self.root.mkdir()
        subprocess.run(
            ["tar", "-C", str(self.root), "--numeric-owner", "-xf", str(tarball)], check=True
        )
        (self.root / "etc/hostname").write_text(f"{HOSTNAME}\n")
        (self.root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n")
        self.cgroup.mkdir()
        script = BOOT.format(
            root=shlex.quote(str(self.root)),
            cgroup=shlex.quote(str(self.cgroup)),
            hostname=HOSTNAME,
            path=INSIDE_ENV[0],
        )
        with self.console_path.open("wb") as console:
            self._booter = subprocess.Popen(
                [*UNSHARE, "/bin/sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        try:
            self.pid = self._systemd_pid(deadline)
            self._wait_booted(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _systemd_pid(self, deadline: float) -> int:
        """The pid, as this machine sees it, of the host's PID 1 once it is systemd."""
        assert self._booter is not None
        children = Path(f"/proc/{self._booter.pid}/task/{self._booter.pid}/children")
        while time.monotonic() < deadline and self._booter.poll() is None:
            with contextlib.suppress(OSError):
                for word in children.read_text().split():
                    if Path(f"/proc/{word}/comm").read_text().strip() == "systemd":
                        return int(word)
            time.sleep(0.05)
        raise HostError(f"no systemd started; console:\n{self.console()[-3000:]}")

    def _wait_booted(self, deadline: float) -> None:
        assert self._booter is not None
        while True:
            state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            # "degraded": logind and e2scrub fail in namespaces; nothing else does.
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline or self._booter.poll() is not None:
                raise HostError(
                    f"the host did not boot (state {state!r}); console:\n{self.console()[-3000:]}"
                )
            time.sleep(0.2)

    def console(self) -> str:
        return self.console_path.read_text(errors="replace") if self.console_path.exists() else ""

    def stop(self) -> None:
        """Power off, then delete the root."""
        if self._booter is not None and self._booter.poll() is None:
            if self.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGRTMIN + 4)
            try:
                self._booter.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self._booter.pid, signal.SIGKILL)
                self._booter.wait(timeout=10)
        _remove_cgroup(self.cgroup)
        if self.work.exists():
            _delete(self.work)

    def run(
        self,
        command: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 120.0,
        user: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside the host (as root, or as ``user`` with its groups)."""
        argv = ["nsenter", "-t", str(self.pid), "-m", "-p", "-n", "-u", "-i", "-r", "-w"]
        argv += ["/usr/bin/env", "-i", *INSIDE_ENV]
        if user is not None:
            argv += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        done = subprocess.run(
            [*argv, *command], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise HostError(
                f"{shlex.join(command)} exited {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def sh(self, script: str, **options: object) -> subprocess.CompletedProcess[str]:
        return self.run(["/bin/sh", "-ec", script], **options)  # type: ignore[arg-type]

    def main_pid(self, unit: str) -> int:
        shown = self.run(["systemctl", "show", "-p", "MainPID", "--value", unit]).stdout
        return int(shown.strip() or 0)

    def path(self, inside: str) -> Path:
        """A path of the host, as this machine reaches it."""
        return self.root / inside.lstrip("/")
