"""``popauth follow``: build the follower from the settings and run it until signalled."""

from __future__ import annotations

import os
import pwd
import signal
import stat
import time
from pathlib import Path
from types import FrameType

from popauth.config import Settings
from popauth.follow.follower import Counters, Follower, IngestReporter, LineJudge
from popauth.follow.formats import build_format
from popauth.follow.sources import FollowedFile, LineSource, StandardInput
from popauth.logs import configure_logging


class FollowSetupError(ValueError):
    """The follower cannot start with these settings; the message says why."""


def trusted_uids(users: tuple[str, ...]) -> frozenset[int]:
    return frozenset(int(u) if u.isdigit() else pwd.getpwnam(u).pw_uid for u in users)


def check_log_file(path: Path, trust: str) -> None:
    """A log trusted as a whole must not be writable by anyone but its owner."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return  # created later by the server; checked again at the next start
    if trust == "file" and status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise FollowSetupError(
            f"{path} is writable by its group or by everyone: anyone who can write it "
            "could whitelist any address (chmod go-w)"
        )


def build_follower(settings: Settings, log: str | None = None) -> Follower:
    log_name = log or settings.follow.log
    if not log_name:
        raise FollowSetupError("no log to follow: give one, or set follow_log")
    if not settings.follow.format:
        raise FollowSetupError("set follow_format to the POP/IMAP server's log format")
    login_format = build_format(
        settings.follow.format, settings.follow.programs, settings.follow.regex
    )
    logger = configure_logging(settings.log.format, settings.log.level).bind(door="follow")
    started = time.time()
    source: LineSource
    if log_name == "-":
        source = StandardInput()
        # No position to go on from: whatever was logged before this start
        # (tail -F prints the last lines first) is old.
        not_before = float(int(started))
    else:
        path = Path(log_name)
        check_log_file(path, settings.follow.trust)
        state = settings.follow.state_path
        source = FollowedFile(path, state)
        not_before = 0.0
    counters = Counters()
    judge = LineJudge(
        login_format=login_format,
        trust=settings.follow.trust,
        trusted_uids=trusted_uids(settings.follow.trusted_users),
        max_age=settings.follow.max_age,
        not_before=not_before,
        log=logger,
        counters=counters,
    )
    logger.info(
        "follow_start",
        log=log_name,
        format=login_format.name,
        trust=settings.follow.trust,
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
