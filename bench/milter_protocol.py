"""B1: RCPT decisions per second over the milter socket, popauth against a no-op milter.

The MTA side is written here over raw UNIX sockets, with every packet
encoded once in advance, so that the harness itself costs as little CPU as
possible (it shares the two cores with the milter). Each session is what
Postfix does for one SMTP connection carrying one message with one
recipient: a new milter connection, option negotiation, the connect
macros and CONNECT, MAIL, the RCPT macros and RCPT, QUIT. The harness does
not offer SMFIF_SETSYMLIST, and it honours the SMFIP_NO*/NR* flags the milter
negotiates.

The mix cycles through five clients: whitelisted, local-recipient,
whitelisted, local-recipient, stranger relaying (refused). popauth answers
ACCEPT at MAIL for a whitelisted client; that counts as its decision. The
no-op milter answers CONTINUE at every step.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    BenchResult,
    Check,
    Mode,
    drive,
    own_senders_file,
    process_cpu_seconds,
    rounds,
)
from harness.popauth import PopauthServer

# Milter protocol (version 6) constants, from libmilter's mfdef.h.
VERSION = 6
PROTOCOL_ALL = 0x1FFFFF
# The MAIL FROM of every session.
MAIL_SENDER = "sender@example.org"
P_NOCONNECT, P_NOMAIL, P_NORCPT = 0x1, 0x4, 0x8
P_NR_CONN, P_NR_MAIL, P_NR_RCPT = 0x1000, 0x4000, 0x8000
ACCEPT, CONTINUE, REJECT, TEMPFAIL, REPLYCODE = b"a", b"c", b"r", b"t", b"y"

LOCAL_DOMAIN = "local.test"
CLASSES = ("whitelisted", "local", "whitelisted", "local", "refused")
WHITELISTED_IPS = [f"10.20.{n // 250}.{n % 250 + 1}" for n in range(200)]
LOCAL_IPS = [f"198.51.100.{n + 1}" for n in range(200)]
REFUSED_IPS = [f"203.0.113.{n + 1}" for n in range(200)]


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


def macros(stage: bytes, pairs: dict[str, str]) -> bytes:
    body = b"".join(name.encode() + b"\0" + value.encode() + b"\0" for name, value in pairs.items())
    return packet(b"D", stage + body)


def read_packet(sock: socket.socket) -> tuple[bytes, bytes]:
    header = sock.recv(4, socket.MSG_WAITALL)
    if len(header) < 4:
        raise ConnectionError("milter closed the connection")
    (length,) = struct.unpack("!I", header)
    body = sock.recv(length, socket.MSG_WAITALL)
    if len(body) < length:
        raise ConnectionError("milter closed the connection mid-packet")
    return body[:1], body[1:]


@dataclass(frozen=True)
class Script:
    """One session's packets, encoded once."""

    kind: str
    connect: bytes
    mail: bytes
    rcpt: bytes


def script(kind: str, ip: str, port: int) -> Script:
    connect = macros(
        b"C",
        {
            "j": "mx.popauth.test",
            "{daemon_name}": "smtpd",
            "{daemon_addr}": "127.0.0.1",
            "v": "Postfix 3.7",
            "_": f"client.example [{ip}]",
            "{client_addr}": ip,
        },
    ) + packet(b"C", b"client.example\0" + b"4" + struct.pack("!H", port) + ip.encode() + b"\0")
    mail = macros(
        b"M", {"i": "4ABCDEF", "{mail_addr}": MAIL_SENDER, "{mail_mailer}": "smtp"}
    ) + packet(b"M", f"<{MAIL_SENDER}>\0".encode())
    if kind == "local":
        recipient, mailer = f"user@{LOCAL_DOMAIN}", "local"
    else:
        recipient, mailer = "friend@remote.example", "smtp"
    rcpt = macros(
        b"R",
        {"{rcpt_mailer}": mailer, "{rcpt_host}": recipient.split("@")[1], "{rcpt_addr}": recipient},
    ) + packet(b"R", f"<{recipient}>\0".encode())
    return Script(kind, connect, mail, rcpt)


OPTNEG = packet(b"O", struct.pack("!III", VERSION, 0, PROTOCOL_ALL))
QUIT = packet(b"Q")


def scripts() -> list[Script]:
    made = []
    for index in range(200):
        for kind in CLASSES:
            ip = {"whitelisted": WHITELISTED_IPS, "local": LOCAL_IPS, "refused": REFUSED_IPS}[kind]
            made.append(script(kind, ip[index], 40000 + index))
    return made


class Tally:
    """Replies per client class (the final one of each session)."""

    def __init__(self) -> None:
        self.replies: dict[tuple[str, bytes], int] = {}

    def add(self, kind: str, reply: bytes) -> None:
        key = (kind, reply)
        self.replies[key] = self.replies.get(key, 0) + 1

    def summary(self) -> str:
        return ", ".join(
            f"{kind}:{reply.decode()}={count}"
            for (kind, reply), count in sorted(self.replies.items())
        )


def negotiate(sock: socket.socket, path: str, *, timeout: float) -> int:
    """Connect ``sock`` to the milter at ``path``, negotiate, and return its protocol bits."""
    sock.settimeout(timeout)
    sock.connect(path)
    sock.sendall(OPTNEG)
    command, data = read_packet(sock)
    if command != b"O":
        raise ConnectionError(f"bad option negotiation reply {command!r}")
    _, _, protocol = struct.unpack("!III", data[:12])
    return int(protocol)


def session(path: str, plan: Script, tally: Tally) -> None:
    """One SMTP session as Postfix reports it; records the deciding reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        protocol = negotiate(sock, path, timeout=10)
        final = CONTINUE
        for step, skip, no_reply in (
            (plan.connect, P_NOCONNECT, P_NR_CONN),
            (plan.mail, P_NOMAIL, P_NR_MAIL),
            (plan.rcpt, P_NORCPT, P_NR_RCPT),
        ):
            if protocol & skip:
                continue
            sock.sendall(step)
            if protocol & no_reply:
                continue
            final, data = read_packet(sock)
            if final == REPLYCODE:
                final = data[:1]  # "5" or "4": a rejection with text
            if final != CONTINUE:
                break
        sock.sendall(QUIT)
    tally.add(plan.kind, final)


# -- the milters under test ------------------------------------------------------


class NoopMilterProcess:
    """A pymilter milter of the bench (by default the no-op one) in a process of its own."""

    def __init__(
        self,
        directory: Path,
        *,
        wrapper: Sequence[str] = (),
        module: str = "bench.noop_milter",
        arguments: Sequence[str] = (),
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # A command that runs the milter (e.g. under a profiler); it must exec it.
        self.wrapper = list(wrapper)
        self.module = module
        self.arguments = list(arguments)
        self.milter_path = directory / "milter.sock"
        self.log_path = directory / f"{module.rpartition('.')[2]}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> NoopMilterProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *self.wrapper,
                    sys.executable,
                    "-m",
                    self.module,
                    f"unix:{self.milter_path}",
                    *self.arguments,
                ],
                cwd=REPO,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.module} exited:\n{self.log_path.read_text()}")
            with contextlib.suppress(OSError):
                session(str(self.milter_path), script("local", "192.0.2.1", 1), Tally())
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.module} not ready")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as poke:
            poke.connect(str(self.milter_path))  # libmilter notices the stop flag at once
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


POPAUTH_SETTINGS: dict[str, Any] = {
    "trusted_networks": [],
    "local_domains": [LOCAL_DOMAIN],
    "local_mailers": ["local"],
    # What operators run: the product defaults (console lines, info level).
    "log_format": "console",
    "log_level": "info",
    # But no relay budget: a whitelisted message is accepted at MAIL, as
    # before there was one; relay-budget-cost (bench/relay_budget.py)
    # measures the budget side by side.
    "pop_first_max_recipients": "",
}


def popauth_settings(directory: Path, **overrides: Any) -> dict[str, Any]:
    """POPAUTH_SETTINGS, with the whitelisted sessions' sender (MAIL_SENDER)
    their user's own, as a user's is."""
    owned = own_senders_file(directory, len(WHITELISTED_IPS), MAIL_SENDER)
    return {"pop_first_sender_addresses": str(owned), **POPAUTH_SETTINGS, **overrides}


def start_popauth(directory: Path, **overrides: Any) -> PopauthServer:
    directory.mkdir(parents=True, exist_ok=True)
    server = PopauthServer(directory, **popauth_settings(directory, **overrides)).start()
    for index, ip in enumerate(WHITELISTED_IPS):
        reply = server.ask(f"LOGIN {ip} user{index:03d}")
        if not reply or not reply[0].startswith("OK"):
            raise RuntimeError(f"could not whitelist {ip}: {reply}")
    return server


def pid_of(process: subprocess.Popen[bytes] | None) -> int:
    if process is None:
        raise RuntimeError("milter process not running")
    return process.pid


EXPECTED_POPAUTH = {"whitelisted": ACCEPT, "local": CONTINUE, "refused": b"5"}


@dataclass(frozen=True)
class Sessions:
    """One milter under measurement: its name, socket, process, sessions and tally."""

    name: str
    path: str
    pid: int
    plans: Sequence[Script]
    tally: Tally
    # What a session counts as in the rate's unit, e.g. "decisions/s".
    unit: str


def measure_sessions(result: BenchResult, milter: Sessions, clients: int, seconds: float) -> None:
    """Run ``milter``'s sessions from ``clients`` threads for ``seconds`` (negative:
    a warm-up, not recorded); record the rate and the milter's CPU per session."""

    def one(worker: int, iteration: int) -> None:
        plan = milter.plans[(iteration * clients + worker) % len(milter.plans)]
        session(milter.path, plan, milter.tally)

    cpu_before = process_cpu_seconds(milter.pid)
    outcome = drive(clients, abs(seconds), one, max_operations=200_000)
    cpu = process_cpu_seconds(milter.pid) - cpu_before
    if outcome.errors:
        raise RuntimeError(
            f"{result.key} {milter.name}, {clients} client(s): {outcome.errors} errors:"
            f" {outcome.first_error}"
        )
    if seconds > 0:
        name = milter.name
        result.metric(f"{name}, {clients} client(s)", milter.unit).samples.append(outcome.rate)
        result.metric(f"{name} CPU per session, {clients} client(s)", "us").samples.append(
            1e6 * cpu / max(1, outcome.operations)
        )


def run(mode: Mode, workdir: Path) -> BenchResult:
    result = BenchResult("B1", "milter protocol: decisions/s over the milter socket")
    plans = scripts()
    noop = NoopMilterProcess(workdir / "noop").start()
    info = start_popauth(workdir / "popauth-info")
    warning = start_popauth(workdir / "popauth-warning", log_level="warning")
    milters = {
        "no-op": str(noop.milter_path),
        "popauth": str(info.milter_path),
        "popauth[warning]": str(warning.milter_path),
    }
    pids = {
        "no-op": pid_of(noop.process),
        "popauth": pid_of(info.process),
        "popauth[warning]": pid_of(warning.process),
    }
    tallies = {name: Tally() for name in milters}
    concurrencies = (1, 8)
    try:
        setups = [f"{name}|{clients}" for clients in concurrencies for name in milters]

        def measure(setup: str, seconds: float) -> None:
            name, clients_text = setup.split("|")
            clients = int(clients_text)
            path, tally = milters[name], tallies[name]

            measure_sessions(
                result,
                Sessions(name, path, pids[name], plans, tally, "decisions/s"),
                clients,
                seconds,
            )

        rounds(mode, setups, measure)
    finally:
        noop.stop()
        info.stop()
        warning.stop()

    for clients in concurrencies:
        ratio = result.ratio(
            f"popauth/no-op, {clients} client(s)",
            f"popauth, {clients} client(s)",
            f"no-op, {clients} client(s)",
        )
        result.checks.append(Check(ratio.name, ratio.stats().median, ">=", 0.8))
        # popauth's own work: its CPU per session beyond the no-op milter's,
        # per round; issue 21 measured 93 us (193 against 100) and asked for half.
        own = result.metric(f"popauth's own CPU per session, {clients} client(s)", "us")
        own.difference = True
        own.samples = [
            mine - baseline
            for mine, baseline in zip(
                result.metric(f"popauth CPU per session, {clients} client(s)", "us").samples,
                result.metric(f"no-op CPU per session, {clients} client(s)", "us").samples,
                strict=True,
            )
        ]
        if clients == 1:
            result.checks.append(Check(own.name, own.stats().median, "<=", 46.5, "us"))
        result.ratio(
            f"popauth[warning]/no-op, {clients} client(s)",
            f"popauth[warning], {clients} client(s)",
            f"no-op, {clients} client(s)",
        )
    for name in ("popauth", "popauth[warning]"):
        for kind, expected in EXPECTED_POPAUTH.items():
            wrong = sum(
                count
                for (seen_kind, reply), count in tallies[name].replies.items()
                if seen_kind == kind and reply != expected
            )
            if wrong:
                raise RuntimeError(f"B1: {name} gave {wrong} wrong verdicts for {kind} clients")
    result.notes += [
        "one milter connection per session (as Postfix does): optneg, CONNECT, MAIL, RCPT, QUIT",
        "mix per 5 sessions: 2 whitelisted (popauth: ACCEPT at MAIL), 2 local recipient, "
        "1 refused (550)",
        "popauth[warning] = log_level warning (no per-decision log line); "
        "popauth = product defaults (console, info)",
        f"final replies, popauth: {tallies['popauth'].summary()}",
        f"final replies, no-op: {tallies['no-op'].summary()}",
    ]
    return result
