"""The client side of ``popauth`` runs on the system Python with the standard library only.

The login hook's ``popauth`` and the operator's commands (login, query,
revoke...) run where only the standard library may be installed: the shared
runtime of the live tests copies the package for the system Python, and a
POP host need not have the daemon's libraries. Importing the command line
and loading the settings must therefore not pull in a daemon library.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DAEMON_LIBRARIES = ("structlog", "Milter", "milter", "redis", "prometheus_client", "cachetools")

# Refuses the daemon's libraries, then runs ``popauth ARGS`` as the launcher does.
PROBE = """
import importlib.abc, runpy, sys
blocked = set(sys.argv[1].split(","))
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"daemon library imported by the client side: {name}")
        return None
sys.meta_path.insert(0, Refuse())
sys.path.insert(0, sys.argv[2])
sys.argv = ["popauth", *sys.argv[3:]]
runpy.run_module("popauth", run_name="__main__")
"""


def run_client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            PROBE,
            ",".join(DAEMON_LIBRARIES),
            str(REPO / "milter"),
            *args,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_the_command_line_and_the_settings_need_no_daemon_library(tmp_path: Path) -> None:
    shown = run_client("query", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "usage: popauth query" in shown.stdout
    settings = tmp_path / "popauth.toml"
    settings.write_text("ttl = 600\n", encoding="utf-8")
    checked = run_client("check-config", str(settings))
    assert "daemon library imported" not in checked.stderr, checked.stderr


def test_the_probe_catches_a_daemon_import() -> None:
    # The same refusal on a module that does need structlog: so the test above can fail.
    refuse_then_import = PROBE.replace(
        'runpy.run_module("popauth", run_name="__main__")', "import popauth.telemetry.logs"
    )
    probe = subprocess.run(
        [sys.executable, "-I", "-c", refuse_then_import, "structlog", str(REPO / "milter")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert probe.returncode != 0
    assert "daemon library imported by the client side: structlog" in probe.stderr
