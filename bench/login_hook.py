"""B3: from a POP3 login to relaying, through the real Dovecot hook.

(i) The latency the contrib hook (``contrib/dovecot/popauth-login``, which
runs ``popauth login``) adds to a POP3 login: the time from sending ``PASS``
to ``+OK Logged in.``, on two private Dovecot instances running side by
side, one with the hook and one without, logins alternating between them.

(ii) The time from ``+OK Logged in.`` until a RCPT to a remote recipient from
that address is accepted by Postfix with the popauth milter. The hook is
synchronous, so the very first RCPT must already be accepted: the harness
checks that the address was not whitelisted before the login and counts
first-attempt acceptances; the time shown is one whole SMTP session up to
the RCPT reply (connect, banner, EHLO, MAIL, RCPT), with no retry or wait.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.common import POPAUTH_BIN, BenchResult, Check, Mode, Stats
from harness.dovecot import DovecotInstance
from harness.popauth import PopauthServer
from harness.ports import free_port
from harness.postfix import PostfixInstance
from harness.shared_runtime import shared_runtime
from harness.smtp import rcpt_code

USERS = {"alice": "{PLAIN}wonderland", "bob": "{PLAIN}builder", "carol": "{PLAIN}secret"}
PASSWORDS = {"alice": "wonderland", "bob": "builder", "carol": "secret"}
LOCAL_DOMAIN = "local.test"


class LoginFailed(RuntimeError):
    pass


def time_command(command: list[str]) -> float:
    """Wall-clock milliseconds of one run of ``command`` (which must succeed)."""
    started = time.perf_counter()
    subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=10, check=True)
    return (time.perf_counter() - started) * 1000


def pop3_login(port: int, user: str, source_ip: str) -> tuple[float, float]:
    """Log in; returns (seconds from PASS to ``+OK``, monotonic time of ``+OK``)."""
    with socket.create_connection(("127.0.0.1", port), 10, (source_ip, 0)) as sock:
        reader = sock.makefile("rb")
        if not reader.readline().startswith(b"+OK"):
            raise LoginFailed("no POP3 greeting")
        sock.sendall(f"USER {user}\r\n".encode())
        if not reader.readline().startswith(b"+OK"):
            raise LoginFailed("USER refused")
        # The clock starts before sendall: on a loaded machine the harness can
        # be descheduled right after sending and find the reply already there.
        sent = time.perf_counter()
        sock.sendall(f"PASS {PASSWORDS[user]}\r\n".encode())
        reply = reader.readline()
        done = time.perf_counter()
        if not reply.startswith(b"+OK"):
            raise LoginFailed(f"PASS refused: {reply!r}")
        sock.sendall(b"QUIT\r\n")
        reader.readline()
        reader.close()
    return done - sent, done


def hook_breakdown(result: BenchResult, server: PopauthServer, runs: int) -> None:
    """Where the hook's time goes: the client it runs, and a bare interpreter."""
    cli = result.metric("`popauth login` run alone", "ms", show_p99=True)
    bare_python = result.metric("`python -c pass` (venv interpreter)", "ms", show_p99=True)
    bare_python_s = result.metric("`python -I -S -c pass`", "ms", show_p99=True)
    for index in range(runs):
        source = f"127.6.{index // 250 + 1}.{index % 250 + 1}"
        login = [str(POPAUTH_BIN), "login", "--socket", str(server.ingest_path), source, "x"]
        cli.samples.append(time_command(login))
        bare_python.samples.append(time_command([sys.executable, "-c", "pass"]))
        bare_python_s.samples.append(time_command([sys.executable, "-I", "-S", "-c", "pass"]))


def summarise(result: BenchResult, first_ok: int, relays: int, logins: int) -> None:
    hook = result.metric("login, with hook", "ms").stats()
    bare = result.metric("login, no hook", "ms").stats()
    to_rcpt = result.metric("+OK Logged in. -> RCPT 250", "ms")
    result.checks += [
        Check("hook adds, median (ms)", hook.median - bare.median, "<=", 20.0, "ms"),
        Check("hook adds, p99 (ms)", hook.p99 - bare.p99, "<=", 50.0, "ms"),
        Check("first RCPT after login accepted (%)", 100.0 * first_ok / relays, ">=", 100.0, "%"),
    ]
    if to_rcpt.samples:
        rcpt = Stats.of(to_rcpt.samples)
        result.notes.append(
            f"+OK -> RCPT 250: median {rcpt.median:.1f} ms is one whole SMTP session "
            "(connect, banner, EHLO, MAIL, RCPT) started right after the login; no retry"
        )
    result.notes += [
        f"{first_ok}/{relays} RCPTs sent right after '+OK Logged in.' were accepted at "
        "the first attempt (each address checked NOTFOUND before its login); "
        "a client without login got 550",
        f"{logins} logins per Dovecot, alternating; latency = PASS sent -> '+OK Logged in.'",
    ]


def run(mode: Mode, workdir: Path) -> BenchResult:
    result = BenchResult("B3", "POP3 login to relay through the Dovecot hook")
    workdir.mkdir(parents=True, exist_ok=True)
    logins = 40 if mode.quick else 300
    relays = 20 if mode.quick else 100
    popauth_dir = workdir / "popauth"
    popauth_dir.mkdir()
    server = PopauthServer(
        popauth_dir,
        trusted_networks=[],
        local_domains=[LOCAL_DOMAIN],
        local_mailers=["local"],
        ingest_allowed_users=["dovecot"],
        log_format="console",
    ).start()
    hooked = DovecotInstance(
        root=workdir / "dovecot-hook",
        pop3_port=free_port(),
        users=USERS,
        # Run as Dovecot's hook user: copies it can reach, wherever the checkout is.
        postlogin_hook=shared_runtime().hook,
        hook_env={
            "POPAUTH": str(shared_runtime().popauth),
            "POPAUTH_SOCKET": str(server.ingest_path),
        },
    )
    plain = DovecotInstance(root=workdir / "dovecot-plain", pop3_port=free_port(), users=USERS)
    postfix = PostfixInstance(
        root=workdir / "postfix",
        smtp_port=free_port(),
        milter=f"unix:{server.milter_path}",
        local_domain=LOCAL_DOMAIN,
    )
    running: list[DovecotInstance | PostfixInstance] = []
    with_hook = result.metric("login, with hook", "ms", show_p99=True)
    without_hook = result.metric("login, no hook", "ms", show_p99=True)
    to_rcpt = result.metric("+OK Logged in. -> RCPT 250", "ms", show_p99=True)
    first_ok = 0
    try:
        for daemon in (hooked, plain, postfix):
            daemon.start()
            running.append(daemon)
        users = itertools.cycle(PASSWORDS)
        # Warm-up: the first logins start Dovecot's login and pop3 processes.
        for index in range(5):
            pop3_login(hooked.pop3_port, "alice", f"127.4.0.{index + 1}")
            pop3_login(plain.pop3_port, "alice", f"127.4.0.{index + 1}")
        for index in range(logins):
            source = f"127.4.{index // 250 + 1}.{index % 250 + 1}"
            user = next(users)
            pair = [(hooked, with_hook), (plain, without_hook)]
            if index % 2:
                pair.reverse()  # alternate which one goes first
            for instance, metric in pair:
                latency, _ = pop3_login(instance.pop3_port, user, source)
                metric.samples.append(latency * 1000)

        # (ii): a fresh address each time, checked unlisted before the login.
        for index in range(relays):
            source = f"127.5.{index // 250 + 1}.{index % 250 + 1}"
            before = server.ask(f"QUERY {source}")[0]
            if not before.startswith("NOTFOUND"):
                raise RuntimeError(f"{source} already whitelisted: {before}")
            _, logged_in = pop3_login(hooked.pop3_port, next(users), source)
            code = rcpt_code(postfix.smtp_port, source, "friend@remote.example")
            accepted = time.perf_counter()
            if code == 250:
                first_ok += 1
                to_rcpt.samples.append((accepted - logged_in) * 1000)
        stranger = rcpt_code(postfix.smtp_port, "127.5.250.250", "friend@remote.example")

        hook_breakdown(result, server, logins // 4)
    finally:
        for daemon in running:
            daemon.stop()
        server.stop()

    if stranger != 550:
        raise RuntimeError(f"control: a client without login got {stranger}, not 550")
    summarise(result, first_ok, relays, logins)
    return result
