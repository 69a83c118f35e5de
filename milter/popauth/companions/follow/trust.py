"""What a counted login line proves, format by format, on the running kernel.

rsyslog's envelope names the uid and pid of the process that wrote the
message into ``/dev/log``: the *last* process on the line's way, not its
author. ``courierlogger`` runs as root and sends to syslog whatever Courier's
programs write to their stderr, and the program that writes Courier's
``LOGIN`` line, ``courierpop3d`` (or ``imapd``), runs as the logged-in user:
it is started afresh (exec) after Courier became that user, so that user may
trace it (ptrace) where the kernel allows it, and before it logs the login
it runs ``Maildir/loginexec``, a program the user may put there, with the
same stderr. Either way a mail user writes a root-stamped ``LOGIN`` line
for any address.

So each format says what its line really proves, and the follower refuses
to start where that is not enough:

- ``courier``: only where no mail user can run a program or write a file on
  this host (``follow_mail_users_run_programs = false``) *and* the kernel
  keeps users from tracing their own processes (``kernel.yama.ptrace_scope``
  at least 1). ``contrib/courier/popauth-courier-login`` reports Courier's
  logins from its PAM stack instead, as root, without the log.
- the formats whose writer was not seen here (``qpopper``, ``uw``,
  ``regex``): a warning while users may trace their own processes.
- ``follow_trust = "file"``: a warning that every line of the file counts.

The ptrace check reads ``/proc/sys/kernel/yama/ptrace_scope``; without Yama
(the file is missing) a process may be traced by any process of its uid,
unless it changed uid without exec (the kernel then marks it non-dumpable).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from popauth.config import FollowTrust

YAMA_PTRACE_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")
PID_MAX = Path("/proc/sys/kernel/pid_max")
COURIER_REPORTER = "contrib/courier/popauth-courier-login"


@dataclass(frozen=True, slots=True)
class LineOrigin:
    """Who writes a format's counted line, and what a counted line therefore proves."""

    proves: str
    # The logged-in user's own process writes the line, and a root process
    # forwards it (Courier): the user can write it for any address.
    written_by_the_user: bool = False
    # The writer was seen on a real server here (tests/live), not only read about.
    seen_live: bool = True


ORIGINS: dict[str, LineOrigin] = {
    "courier": LineOrigin(
        "courierlogger (root) forwarded a line that courierpop3d or imapd wrote to its "
        "stderr; they run as the logged-in user, who may write there too (Maildir/loginexec, "
        "ptrace): the line proves no more than that user's word",
        written_by_the_user=True,
    ),
    "cyrus": LineOrigin(
        "a process running as the trusted user (cyrus) sent it: Cyrus serves every session "
        "as cyrus, so no mail user has a process that could send it"
    ),
    "dovecot": LineOrigin(
        "Dovecot's log process (root) wrote what a login process (pop3-login, imap-login, "
        "running as dovenull) sent; the mail processes that run as the users change uid "
        "without exec, so their users cannot trace them"
    ),
    "popa3d": LineOrigin(
        "the session line: the root popa3d child that accepted the connection; the success "
        "line: the same live pid, as root or as the mail account it names (popa3d logs it "
        "after becoming that user, without exec)"
    ),
    "solid-pop3d": LineOrigin(
        "a root process sent it: solid-pop3d logs the login before it becomes the user, "
        "and it becomes the user without exec, so that user cannot trace it"
    ),
    "qpopper": LineOrigin(
        "a process of a trusted user sent it (which Qpopper process logs the login, and as "
        "whom, was not checked here)",
        seen_live=False,
    ),
    "uw": LineOrigin(
        "a process of a trusted user sent it (UW's servers log their Login line after "
        "becoming the user; such a line carries the user's uid and is refused)",
        seen_live=False,
    ),
    "regex": LineOrigin(
        "a process of a trusted user sent a line of that pattern: what that proves is what "
        "the operator knows of the server",
        seen_live=False,
    ),
}


def read_ptrace_scope(path: Path | None = None) -> int | None:
    """``kernel.yama.ptrace_scope``; None without Yama; unreadable or odd: 0 (fail closed)."""
    path = path or YAMA_PTRACE_SCOPE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


def users_trace_own_processes(scope: int | None) -> bool:
    """Whether a user may attach to a process of its own that it did not start."""
    return scope is None or scope == 0


def ptrace_meaning(scope: int | None) -> str:
    if scope is None:
        return (
            "Yama is absent: a user may trace (ptrace) every process running as that user, "
            "except those that changed uid without exec"
        )
    if scope == 0:
        return (
            "kernel.yama.ptrace_scope = 0: a user may trace (ptrace) every process running as "
            "that user, except those that changed uid without exec"
        )
    if scope == 1:
        return (
            "kernel.yama.ptrace_scope = 1: a process may trace only its own descendants, so a "
            "user cannot attach to a server process it did not start"
        )
    if scope == 2:
        return "kernel.yama.ptrace_scope = 2: only processes with CAP_SYS_PTRACE may trace"
    return f"kernel.yama.ptrace_scope = {scope}: no process may be traced"


def read_pid_max(path: Path | None = None) -> int | None:
    try:
        return int((path or PID_MAX).read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class TrustReport:
    """What following this format means here: said at start and by check-config."""

    format: str
    ptrace_scope: int | None
    kernel: str
    proves: str
    warnings: tuple[str, ...]
    # Why the follower must not start, or None.
    refusal: str | None

    def lines(self) -> list[str]:
        """The report for people: one line per fact."""
        lines = [
            f"follow: {self.format}: a counted line proves: {self.proves}",
            f"follow: kernel: {self.kernel}",
        ]
        lines += [f"follow: warning: {warning}" for warning in self.warnings]
        if self.refusal is not None:
            lines.append(f"follow: refused: {self.refusal}")
        return lines


def assess(
    format_name: str,
    envelope: FollowTrust,
    ptrace_scope: int | None,
    mail_users_run_programs: bool,
    pid_max: int | None = None,
) -> TrustReport:
    """Whether ``format_name`` may be followed with this envelope on this kernel."""
    origin = ORIGINS[format_name]
    traceable = users_trace_own_processes(ptrace_scope)
    warnings: list[str] = []
    refusal = None
    if origin.written_by_the_user:
        reasons = []
        if mail_users_run_programs:
            reasons.append(
                "a mail user who can run a program or write a file here puts an executable "
                "Maildir/loginexec, which courierpop3d and imapd run with the stderr "
                "courierlogger forwards (follow_mail_users_run_programs = true)"
            )
        if traceable:
            reasons.append(
                f"a mail user may trace its own courierpop3d and write to its stderr "
                f"({ptrace_meaning(ptrace_scope)}; set kernel.yama.ptrace_scope = 1)"
            )
        if reasons:
            refusal = (
                f"{format_name}'s LOGIN line is written by a process of the logged-in user and "
                "forwarded by root, so it can name any address: "
                + "; and ".join(reasons)
                + f". Report Courier's logins with {COURIER_REPORTER} (PAM) instead"
            )
    elif not origin.seen_live and traceable:
        warnings.append(
            f"which process writes {format_name}'s login line was not checked here; if it runs "
            "as the mail user and was started afresh after the switch, or forwards such a "
            "process's output, a mail user can write that line for any address by tracing "
            "that process, as with Courier"
        )
    if format_name == "popa3d" and mail_users_run_programs:
        warnings.append(
            "a mail account that can run programs here could take the pid of a popa3d session "
            "that ended without a word (killed) within follow_session_timeout and log its own "
            "success line for it"
            + (f" (kernel.pid_max = {pid_max})" if pid_max is not None else "")
        )
    if envelope is FollowTrust.FILE:
        warnings.append(
            "follow_trust = file: every line of the file counts; only the server may write "
            "it (a file rsyslog writes takes lines from every local user's logger)"
        )
    return TrustReport(
        format=format_name,
        ptrace_scope=ptrace_scope,
        kernel=ptrace_meaning(ptrace_scope),
        proves=origin.proves,
        warnings=tuple(warnings),
        refusal=refusal,
    )
