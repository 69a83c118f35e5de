"""``popauth setup postfix|dovecot|sendmail``: point a mail host at popauth.

Each target reads the host's configuration and makes a :class:`Plan`: the
exact changes (``postconf -e`` lines, files with their content, commands),
and the reasons to refuse when the configuration contradicts popauth. Without
``--apply`` the plan is printed and nothing changes. With it, a refused plan
changes nothing; otherwise every file about to change is first copied to a
dated backup, the changes are made, the MTA's own check runs (a failure puts
the backups back) and the service reloads. A plan with nothing to change
says so: a second run changes nothing.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from popauth.basics.errors import PopauthError


class SetupError(PopauthError):
    """A step of --apply failed; what was changed so far has been put back."""


@dataclass(frozen=True)
class FileChange:
    """A file written whole (created, or replaced after a backup)."""

    path: Path
    content: str
    mode: int = 0o644


@dataclass
class Plan:
    """What ``setup`` would do on this host, and why it must not."""

    target: str
    # postconf -e NAME=VALUE settings (Postfix's main.cf), in order.
    postconf: list[tuple[str, str]] = field(default_factory=list)
    files: list[FileChange] = field(default_factory=list)
    # Commands run before anything changes (starting popauth): a failure stops there.
    before: list[tuple[str, ...]] = field(default_factory=list)
    # Commands run after the changes, in order (reloads, systemctl).
    commands: list[tuple[str, ...]] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Files copied to a dated backup before anything changes (main.cf).
    backups: list[Path] = field(default_factory=list)
    # The check that must pass after the changes, else the backups go back.
    check: tuple[str, ...] | None = None
    # How the postconf settings are written (with -c DIR for another instance).
    postconf_command: tuple[str, ...] = ("postconf",)

    @property
    def changes_anything(self) -> bool:
        return bool(self.postconf or self.files or self.commands or self.before)

    def describe(self) -> list[str]:
        lines: list[str] = []
        for reason in self.refusals:
            lines.append(f"refused: {reason}")
        if self.refusals:
            lines.append(f"nothing was changed: fix the above and run popauth setup {self.target}")
        elif not self.changes_anything:
            lines.append(f"{self.target}: already set up for popauth; nothing to change")
        else:
            lines.extend(shlex.join(command) for command in self.before)
            for name, value in self.postconf:
                lines.append(shlex.join(["postconf", "-e", f"{name} = {value}"]))
            for change in self.files:
                lines.append(f"# write {change.path}:")
                lines.extend(f"    {line}" for line in change.content.rstrip("\n").split("\n"))
            if self.check is not None:
                lines.append(shlex.join(self.check))
            lines.extend(shlex.join(command) for command in self.commands)
        lines.extend(f"note: {note}" for note in self.notes)
        return lines


def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=120)


def backup_name(path: Path, stamp: str) -> Path:
    return path.with_name(f"{path.name}.popauth-{stamp}")


def apply(plan: Plan) -> list[str]:
    """Make the plan's changes; the lines say what was done. Raises SetupError."""
    if plan.refusals:
        raise SetupError("refused; nothing was changed")
    if not plan.changes_anything:
        return [f"{plan.target}: already set up for popauth; nothing changed"]
    done: list[str] = []
    for command in plan.before:
        _must(run(command), shlex.join(command))
        done.append(shlex.join(command))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    restore: list[tuple[Path, bytes | None]] = []
    changed = [*plan.backups, *(change.path for change in plan.files)]
    for path in changed if plan.postconf or plan.files else []:
        if any(path == kept for kept, _ in restore):
            continue
        if path.exists():
            copy = backup_name(path, stamp)
            copy.write_bytes(path.read_bytes())
            copy.chmod(path.stat().st_mode & 0o777)
            restore.append((path, path.read_bytes()))
            done.append(f"backup: {copy}")
        else:
            restore.append((path, None))

    def put_back() -> None:
        for path, content in restore:
            if content is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(content)

    try:
        for change in plan.files:
            change.path.parent.mkdir(parents=True, exist_ok=True)
            change.path.write_text(change.content)
            change.path.chmod(change.mode)
            done.append(f"wrote {change.path}")
        if plan.postconf:
            settings = [f"{name} = {value}" for name, value in plan.postconf]
            _must(run([*plan.postconf_command, "-e", *settings]), "postconf -e")
            done.extend(shlex.join(["postconf", "-e", s]) for s in settings)
        if plan.check is not None:
            _must(run(plan.check), shlex.join(plan.check))
            done.append(f"{shlex.join(plan.check)}: OK")
    except SetupError:
        put_back()
        raise
    for command in plan.commands:
        _must(run(command), shlex.join(command))
        done.append(shlex.join(command))
    return done


def _must(result: subprocess.CompletedProcess[str], what: str) -> None:
    if result.returncode != 0:
        text = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise SetupError(f"{what} failed: {text[-1] if text else f'exit {result.returncode}'}")
