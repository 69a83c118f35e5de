"""Debian packages unpacked into a private root, not installed.

Some daemons the tests need cannot be installed beside the others: Sendmail
conflicts with Postfix, the syslog-only POP3 servers with Dovecot, and an
installed rsyslog would be the machine's logger. Their .debs are fetched
once with ``apt-get download`` into a cache directory and unpacked with
``dpkg -x`` into a root of their own, from which the tests run them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

# Written last into an unpacked root: the packages it holds.
STAMP = ".unpacked"


class DebError(RuntimeError):
    """A package could not be downloaded or unpacked; the message says what to do."""


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )


def cached_debs(cache_dir: Path, package: str) -> list[Path]:
    """The .debs of ``package`` in ``cache_dir``, oldest version first."""
    return sorted(cache_dir.glob(f"{package}_*.deb"))


def download(packages: Sequence[str], cache_dir: Path) -> None:
    """``apt-get download`` the packages not yet in ``cache_dir`` (after an update if need be)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    missing = [package for package in packages if not cached_debs(cache_dir, package)]
    if not missing:
        return
    result = _run(["apt-get", "download", *missing], cwd=cache_dir)
    if result.returncode != 0:
        update = _run(["apt-get", "update"])
        if update.returncode != 0:
            raise DebError(f"apt-get update failed:\n{update.stderr}")
        result = _run(["apt-get", "download", *missing], cwd=cache_dir)
        if result.returncode != 0:
            raise DebError(
                f"apt-get download {' '.join(missing)} failed (run scripts/bootstrap test):\n"
                f"{result.stderr}"
            )


def unpacked_root(packages: Sequence[str], cache_dir: Path, root: Path) -> Path:
    """The packages downloaded once into ``cache_dir`` and unpacked into ``root``; ``root``.

    Idempotent: .debs already in ``cache_dir`` are not fetched again, and a
    root unpacked earlier from the same packages is reused. The root is
    unpacked beside itself first and renamed, so a run that stops half-way
    leaves no half root behind.
    """
    stamp = root / STAMP
    wanted = " ".join(packages)
    if stamp.is_file() and stamp.read_text() == wanted:
        return root
    download(packages, cache_dir)
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for package in packages:
        deb = cached_debs(cache_dir, package)[-1]
        result = _run(["dpkg", "-x", str(deb), str(staging)])
        if result.returncode != 0:
            raise DebError(f"dpkg -x {deb} failed:\n{result.stderr}")
    (staging / STAMP).write_text(wanted)
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return root
