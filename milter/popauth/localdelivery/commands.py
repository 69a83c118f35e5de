"""Running the MTA's own query tools (postconf, postmap, sendmail -bt)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Where the MTA tools live when PATH (a service's PATH, say) lacks them.
SYSTEM_TOOL_DIRECTORIES = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/sbin")
# Sendmail waits 60 s for an unqualified host name; never let a start hang that long.
COMMAND_TIMEOUT = 20.0


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str

    def error_text(self) -> str:
        """The tool's own complaint, on one line."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return text[-1] if text else f"exit status {self.returncode}"


class CommandUnavailable(Exception):
    """The tool is missing or did not finish in time."""


Runner = Callable[[Sequence[str], str], CommandResult]


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    path = os.pathsep.join(SYSTEM_TOOL_DIRECTORIES)
    return shutil.which(name, path=path)


def run_command(argv: Sequence[str], stdin: str = "") -> CommandResult:
    """Run a tool with ``stdin`` in our environment (so MAIL_CONFIG applies)."""
    try:
        completed = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise CommandUnavailable(f"{argv[0]}: not found") from None
    except PermissionError:
        raise CommandUnavailable(f"{argv[0]}: permission denied") from None
    except subprocess.TimeoutExpired:
        raise CommandUnavailable(
            f"{' '.join(argv)} did not finish within {COMMAND_TIMEOUT:.0f} s"
        ) from None
    return CommandResult(completed.returncode, completed.stdout, completed.stderr)
