"""``popauth follow``: build the follower from the settings and run it until signalled."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path
from types import FrameType

from popauth.basics.errors import StartupError
from popauth.companions.follow.follower import Counters, Follower, IngestReporter, LineJudge
from popauth.companions.follow.formats import build_format
from popauth.companions.follow.sources import MAX_LINE, FollowedFile, LineSource, StandardInput
from popauth.companions.follow.trust import TrustReport, assess, read_pid_max, read_ptrace_scope
from popauth.config import FollowFormat, FollowTrust, Settings
from popauth.telemetry.logs import configure_logging


class FollowSetupError(StartupError, ValueError):
    """The follower cannot start with these settings; the message says why."""


def check_log_file(path: Path, trust: FollowTrust) -> None:
    """A log trusted as a whole must not be writable by anyone but its owner."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return  # created later by the server; checked again at the next start
    if trust is FollowTrust.FILE and status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise FollowSetupError(
            f"{path} is writable by its group or by everyone: anyone who can write it "
            "could whitelist any address (chmod go-w)"
        )


def trust_report(settings: Settings, follow_format: FollowFormat) -> TrustReport:
    """What following ``follow_format`` means on this host's kernel (docs/follow.rst)."""
    return assess(
        follow_format.value,
        settings.follow.trust,
        read_ptrace_scope(),
        settings.follow.mail_users_run_programs,
        read_pid_max(),
    )


def build_follower(settings: Settings, log: str | None = None) -> Follower:
    log_name = log or settings.follow.log
    if not log_name:
        raise FollowSetupError("no log to follow: give one, or set follow_log")
    follow_format = settings.follow.format
    if follow_format is None:
        raise FollowSetupError("set follow_format to the POP/IMAP server's log format")
    login_format = build_format(
        follow_format.value, settings.follow.programs, settings.follow.regex or ""
    )
    trust = trust_report(settings, follow_format)
    if trust.refusal is not None:
        raise FollowSetupError(trust.refusal)
    logger = configure_logging(settings.log.format, settings.log.level).bind(door="follow")
    started = time.time()
    counters = Counters()

    def dropped_overlong_line() -> None:
        counters.refuse("too_long")
        logger.warning("follow_line_dropped", reason="too_long", limit=MAX_LINE)

    source: LineSource
    if log_name == "-":
        source = StandardInput(on_overlong=dropped_overlong_line)
        # No position to go on from: whatever was logged before this start
        # (tail -F prints the last lines first) is old.
        not_before = float(int(started))
    else:
        path = Path(log_name)
        check_log_file(path, settings.follow.trust)
        source = FollowedFile(path, settings.follow.state_path, on_overlong=dropped_overlong_line)
        # Now, not at the first login: a position that cannot be saved is a
        # setup error, and its message names the file.
        source.commit()
        not_before = 0.0
    judge = LineJudge(
        login_format=login_format,
        trust=settings.follow.trust,
        trusted_uids=settings.follow.trusted_uids,
        max_age=settings.follow.max_age,
        not_before=not_before,
        log=logger,
        counters=counters,
        mail_uids=settings.follow.mail_uids,
        session_timeout=settings.follow.session_timeout,
    )
    if settings.follow.trust is FollowTrust.RSYSLOG and not os.access("/proc/1/comm", os.R_OK):
        # hidepid, or another PID namespace than rsyslog's: journald's pid
        # on a line (its sender gone) cannot be told from the sender's.
        logger.warning(
            "follow_processes_hidden",
            problem="/proc shows no other users' processes: journald's pid cannot be recognised",
            fix="run the follower where it sees the host's processes (no hidepid, no private PIDs)",
        )
    logger.info(
        "follow_trust",
        format=trust.format,
        proves=trust.proves,
        ptrace_scope="absent" if trust.ptrace_scope is None else trust.ptrace_scope,
        kernel=trust.kernel,
    )
    for warning in trust.warnings:
        logger.warning("follow_trust_warning", format=trust.format, warning=warning)
    logger.info(
        "follow_start",
        log=log_name,
        format=login_format.name,
        trust=settings.follow.trust.value,
        programs=sorted(login_format.programs),
        resumed=getattr(source, "resumed_from", None) is not None,
        pid=os.getpid(),
    )
    return Follower(
        source=source,
        judge=judge,
        reporter=IngestReporter(str(settings.ingest.socket), settings.ingest.timeout, logger),
        poll_interval=settings.follow.poll_interval,
        max_age=settings.follow.max_age,
        log=logger,
        counters=counters,
    )


def run_until_signalled(follower: Follower) -> None:
    def request_stop(signum: int, frame: FrameType | None) -> None:
        follower.stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    follower.run()
