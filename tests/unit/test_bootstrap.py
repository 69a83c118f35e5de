"""``make run`` installs only what running popauth needs: never an MTA.

Checked with apt's own resolver against an empty package database, i.e. as
on a fresh host: ``apt-get install -s`` of the runtime list must plan no
mail transport agent, no POP/IMAP server and no Redis.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = REPO / "scripts" / "packages"
# Virtual packages whose providers popauth must never pull in.
FORBIDDEN_ROLES = ("mail-transport-agent", "pop3-server", "imap-server")
FORBIDDEN_NAMES = ("postfix", "sendmail", "exim4", "dovecot", "redis", "courier")


def package_list(name: str) -> list[str]:
    words: list[str] = []
    for line in (PACKAGES / name).read_text().splitlines():
        words += line.partition("#")[0].split()
    return words


def planned_on_a_fresh_host(packages: list[str], tmp_path: Path) -> set[str]:
    """What apt would install for ``packages`` on a host with nothing installed."""
    status = tmp_path / "empty-status"
    status.write_text("")
    completed = subprocess.run(
        [
            "apt-get",
            "-s",
            "-o",
            f"Dir::State::status={status}",
            "-o",
            "Debug::NoLocking=1",
            "install",
            "--no-install-recommends",
            *packages,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return {line.split()[1] for line in completed.stdout.splitlines() if line.startswith("Inst ")}


def providers(role: str) -> set[str]:
    shown = subprocess.run(
        ["apt-cache", "showpkg", role], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    found: set[str] = set()
    in_provides = False
    for line in shown.splitlines():
        if line.startswith("Reverse Provides:"):
            in_provides = True
        elif in_provides and line.strip():
            found.add(line.split()[0])
    return found


def forbidden_among(planned: set[str]) -> set[str]:
    bad = {name for name in planned if name.startswith(FORBIDDEN_NAMES)}
    for role in FORBIDDEN_ROLES:
        bad |= planned & providers(role)
    return bad


def test_the_runtime_list_pulls_in_no_mta_pop_server_or_redis(tmp_path: Path) -> None:
    runtime = package_list("runtime.txt")
    assert set(runtime) == {"libmilter-dev", "gcc", "python3-dev", "python3-venv"}
    planned = planned_on_a_fresh_host(runtime, tmp_path)
    assert "libmilter-dev" in planned  # the plan is real, not empty
    assert forbidden_among(planned) == set()


def test_the_check_sees_an_mta_when_there_is_one(tmp_path: Path) -> None:
    # The test list does pull in Postfix and Dovecot: the check must see them.
    planned = planned_on_a_fresh_host(package_list("test.txt"), tmp_path)
    assert {"postfix", "dovecot-pop3d", "redis-server"} <= forbidden_among(planned)


def test_make_run_bootstraps_the_runtime_only() -> None:
    dry_run = subprocess.run(
        ["make", "-n", "-C", str(REPO), "run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "scripts/bootstrap run" in dry_run
    assert "scripts/bootstrap test" not in dry_run
