"""The code other users run, copied where they can reach it.

Dovecot runs the post-login hook as its internal user, and tests run
popauth's client as ``dovecot`` or ``nobody``. The checkout may sit in a
directory only root can enter (root's home, a ``mktemp -d``), so the hook
and a client runtime (the ``popauth`` package's source, whose client side
needs only the standard library, and a launcher for the system Python) are
copied once per test process into a world-readable temporary directory,
removed at exit.
"""

from __future__ import annotations

import atexit
import functools
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class SharedRuntime:
    root: Path
    # contrib/dovecot/popauth-login
    hook: Path
    # ``popauth`` for its client subcommands (login, query, ...).
    popauth: Path

    def python(self, code: str) -> list[str]:
        """A command running ``code`` with the system Python and this copy of popauth."""
        lib = str(self.root / "lib")
        return [SYSTEM_PYTHON, "-I", "-c", f"import sys; sys.path.insert(0, {lib!r}); {code}"]


class RuntimeUnreachable(RuntimeError):
    """Other users cannot run the shared copy; the message says what to do."""


def _open_up(root: Path) -> None:
    for directory, _, files in os.walk(root):
        Path(directory).chmod(0o755)
        for name in files:
            path = Path(directory, name)
            path.chmod(0o755 if os.access(path, os.X_OK) else 0o644)


@functools.cache
def shared_runtime() -> SharedRuntime:
    root = Path(tempfile.mkdtemp(prefix="popauth-shared-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    hook = root / "popauth-login"
    shutil.copy(REPO / "contrib" / "dovecot" / "popauth-login", hook)
    hook.chmod(0o755)
    shutil.copytree(
        REPO / "milter" / "popauth",
        root / "lib" / "popauth",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    launcher = root / "bin" / "popauth"
    launcher.parent.mkdir()
    launcher.write_text(
        f"#!{SYSTEM_PYTHON} -I\n"
        "import sys\n"
        f"sys.path.insert(0, {str(root / 'lib')!r})\n"
        "from popauth.cli import main\n"
        "sys.exit(main())\n"
    )
    launcher.chmod(0o755)
    _open_up(root)
    runtime = SharedRuntime(root=root, hook=hook, popauth=launcher)
    check_reachable(runtime, "nobody")
    return runtime


def check_reachable(runtime: SharedRuntime, user: str) -> None:
    """Run the shared client as ``user`` once; RuntimeUnreachable if that fails."""
    entry = pwd.getpwnam(user)
    completed = subprocess.run(
        [str(runtime.popauth), "--help"],
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",
    )
    if completed.returncode != 0:
        raise RuntimeUnreachable(
            f"{user} cannot run {runtime.popauth} ({completed.stderr.strip()}): "
            f"make {runtime.root.parent} traversable for other users (TMPDIR)"
        )
