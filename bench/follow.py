"""B7: ``popauth follow``: login lines per second, cost per line, login-to-relay latency.

- *Throughput*: a burst of login lines (the rsyslog template's form, every
  line a Courier login of a distinct address) is appended to a followed
  file; timed from the first write until ``popauth serve`` has acknowledged
  every LOGIN. The follower runs in this process, the server is a real
  ``popauth serve`` (info logging: one log line per LOGIN, as in production).
- *Parse cost*: the same lines judged (envelope, program, format, trust,
  age) without reporting, in microseconds per line.
- *Latency*: a real solid-pop3d logs through a real rsyslog; ``popauth
  follow`` runs as its own process; a client logs in over POP3, then tries
  RCPT to a remote recipient through real Postfix (one SMTP session per
  attempt) until it gets 250. The time from the end of the POP3 login to
  that 250, per login.
"""

from __future__ import annotations

import datetime
import threading
import time
from pathlib import Path

import structlog

from bench.common import BenchResult, Check, Mode
from harness.dovecot import pop3_login
from harness.logservers import InetdServer, Jail, PrivateRsyslog, ensure_package_root
from harness.popauth import FollowerProcess, PopauthServer
from harness.ports import free_port
from harness.postfix import PostfixInstance
from harness.smtp import REMOTE, rcpt_reply
from popauth.companions.follow.follower import Counters, Follower, IngestReporter, LineJudge
from popauth.companions.follow.formats import build_format
from popauth.companions.follow.sources import FollowedFile
from popauth.config import FollowTrust

LOCAL_DOMAIN = "local.test"
TARGET_LINES_PER_SECOND = 5_000
TARGET_P99_MS = 1_000


def login_lines(count: int, serial: int) -> list[bytes]:
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
    return [
        f"{stamp} uid=0 pid={1000 + n % 30000} courierpop3login: LOGIN, user=user{n % 5000}, "
        f"ip=[::ffff:10.{serial % 256}.{n // 256 % 256}.{n % 256}], port=[40000], "
        "protocol=POP3\n".encode()
        for n in range(count)
    ]


def quiet_logger() -> structlog.typing.FilteringBoundLogger:
    """A logger that drops everything below error, so the run measures following."""
    logger: structlog.typing.FilteringBoundLogger = structlog.wrap_logger(
        structlog.PrintLogger(), wrapper_class=structlog.make_filtering_bound_logger(40)
    )
    return logger


def judge(counters: Counters, log: structlog.typing.FilteringBoundLogger) -> LineJudge:
    return LineJudge(
        login_format=build_format("courier"),
        trust=FollowTrust.RSYSLOG,
        trusted_uids=frozenset({0}),
        max_age=60,
        not_before=0,
        log=log,
        counters=counters,
    )


def throughput_run(server: PopauthServer, workdir: Path, count: int, serial: int) -> float:
    """Lines per second from the first write to the last acknowledgement."""
    path = workdir / f"burst-{serial}.log"
    path.write_text("")
    counters = Counters()
    log = quiet_logger()
    follower = Follower(
        source=FollowedFile(path, None),
        judge=judge(counters, log),
        reporter=IngestReporter(str(server.ingest_path), 10.0, log),
        poll_interval=0.01,
        max_age=60,
        log=log,
        counters=counters,
    )
    thread = threading.Thread(target=follower.run, daemon=True)
    thread.start()
    lines = login_lines(count, serial)
    began = time.perf_counter()
    with path.open("ab") as handle:
        for start in range(0, count, 500):  # a busy server's log grows in bursts
            handle.write(b"".join(lines[start : start + 500]))
            handle.flush()
    deadline = time.monotonic() + 120 + count / 1000
    while counters.reported < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {counters.reported} of {count} logins reported")
        time.sleep(0.001)
    elapsed = time.perf_counter() - began
    follower.stopping.set()
    thread.join(10)
    return count / elapsed


def parse_cost_us(count: int) -> float:
    lines = [line.rstrip(b"\n") for line in login_lines(count, 0)]
    counters = Counters()
    line_judge = judge(counters, quiet_logger())
    began = time.perf_counter()
    logins = line_judge.logins(lines, time.time())
    elapsed = time.perf_counter() - began
    if len(logins) != count:
        raise RuntimeError(f"{len(logins)} of {count} lines judged logins")
    return elapsed / count * 1e6


def latency_samples(workdir: Path, samples: int) -> list[float]:
    package_root = ensure_package_root(workdir / "logservers")
    rsyslog = PrivateRsyslog(workdir / "rsyslog", package_root).start()
    jail = Jail(
        workdir / "jail",
        rsyslog.socket_path,
        {"alice": "wonderland"},
        system_users=("spop3d",),
        extra_mounts=("mount -t tmpfs tmpfs /var/lib", "mkdir -p /var/lib/solid-pop3d/bulletins"),
    )
    jail.prepare(("solid-pop3d",))
    pop_port = free_port()
    pop = InetdServer(jail, pop_port, [str(package_root / "usr/sbin/solid-pop3d")])
    (workdir / "popauth").mkdir()
    server = PopauthServer(workdir / "popauth", milter_socket_group="postfix", log_format="console")
    postfix = PostfixInstance(
        root=workdir / "postfix",
        smtp_port=free_port(),
        milter=f"unix:{server.milter_path}",
        local_domain=LOCAL_DOMAIN,
    )
    follower: FollowerProcess | None = None
    try:
        pop.start()
        server.start()
        postfix.start()
        (workdir / "follower").mkdir()
        follower = FollowerProcess(
            workdir / "follower", server, str(rsyslog.log_path), follow_format="solid-pop3d"
        ).start()
        delays: list[float] = []
        for index in range(samples):
            source = f"127.0.{1 + index // 250}.{1 + index % 250}"
            if not pop3_login(pop_port, "alice", "wonderland", source):
                raise RuntimeError(f"POP3 login from {source} failed")
            logged_in = time.perf_counter()
            deadline = time.monotonic() + 10
            while rcpt_reply(postfix.smtp_port, source, REMOTE)[0] != 250:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{source} never relayed:\n{follower.output()}")
            delays.append((time.perf_counter() - logged_in) * 1000)
        return delays
    finally:
        if follower is not None:
            follower.stop()
        postfix.stop()
        server.stop()
        pop.stop()
        rsyslog.stop()


def run(mode: Mode, workdir: Path) -> BenchResult:
    result = BenchResult(
        "B7", "popauth follow: login lines/s, cost per line, login-to-RCPT latency"
    )
    workdir.mkdir(parents=True, exist_ok=True)
    count = 5_000 if mode.quick else 50_000
    backlog_count = 20_000 if mode.quick else 200_000
    (workdir / "serve").mkdir()
    server = PopauthServer(workdir / "serve", log_format="console").start()
    try:
        throughput_run(server, workdir, 1_000, serial=0)  # warm-up
        rates = result.metric("login lines/s, file to acknowledged LOGIN", "lines/s")
        costs = result.metric("judging cost per line", "us")
        for serial in range(1, mode.rounds + 1):
            rates.samples.append(throughput_run(server, workdir, count, serial))
            costs.samples.append(parse_cost_us(20_000))
        # A follower started on a log that grew while it was away reads it
        # all at once: the whole backlog must go out in bounded exchanges.
        backlog = result.metric(f"login lines/s, a backlog of {backlog_count:,} lines", "lines/s")
        backlog.samples.append(throughput_run(server, workdir, backlog_count, mode.rounds + 1))
    finally:
        server.stop()
    latency = result.metric("POP3 login to relayed RCPT", "ms", show_p99=True)
    latency.samples = latency_samples(workdir / "latency", 8 if mode.quick else 60)
    result.checks.append(
        Check(
            "follower keeps up",
            rates.stats().median,
            ">=",
            TARGET_LINES_PER_SECOND,
            "lines/s",
        )
    )
    result.checks.append(
        Check(
            "slowest round keeps up",
            rates.stats().minimum,
            ">=",
            TARGET_LINES_PER_SECOND,
            "lines/s",
        )
    )
    result.checks.append(Check("login-to-RCPT p99", latency.stats().p99, "<=", TARGET_P99_MS, "ms"))
    result.notes.append(
        f"{count} login lines per round; every line a login of a distinct address "
        "(the worst case: no line is skipped early)"
    )
    return result
