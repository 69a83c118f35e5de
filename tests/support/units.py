"""systemd-analyze verify of a contrib unit, with this checkout's popauth in it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from harness.popauth import POPAUTH

INSTALLED_POPAUTH = "/usr/local/bin/popauth"


def verify_unit(unit: Path, directory: Path) -> tuple[int, str]:
    """systemd-analyze's exit code and everything it printed for ``unit``.

    The unit is copied into ``directory`` (keeping its name, which systemd
    reads) with the installed popauth path replaced by this checkout's.
    systemd-analyze only warns about unknown keys, so any output is a failure.
    """
    copy = directory / unit.name
    copy.write_text(
        unit.read_text(encoding="utf-8").replace(INSTALLED_POPAUTH, POPAUTH), encoding="utf-8"
    )
    try:
        verified = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(copy)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        copy.unlink()
    return verified.returncode, verified.stdout + verified.stderr
