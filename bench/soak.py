"""B8: soak. Thousands of SMTP sessions through a real Postfix while logins,
revokes, blocks and expiries churn; an oracle predicts every verdict.

Each worker thread owns its own client addresses (127.0.{8+w}.x) and users,
and does everything for them in sequence: LOGIN, REVOKE, BLOCK, UNBLOCK over
the ingest socket, and SMTP sessions (MAIL, then RCPT to a remote or a local
recipient) from those addresses through Postfix to popauth. So the oracle of
each worker sees its own history in order and can predict every verdict
without asking popauth anything.

The oracle (written apart from popauth's code): an address may relay while
its last LOGIN, for a user not blocked at the time, is younger than ``ttl``
and was not revoked since, neither by REVOKE nor by BLOCK of that user; a
local recipient is always accepted; everything else is refused with 550.
The instant of expiry is only known within the LOGIN's round trip, so a
session that overlaps that window (plus a margin) is counted as
indeterminate and left out; every other session is judged.

popauth's resident memory and open file descriptors are read at the start
(after a warm-up) and at the end.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.live.ports import free_port
from tests.live.postfix import PostfixInstance
from tests.support.popauth_server import PopauthServer

from bench.common import BenchResult, Check, Deadline, Mode
from bench.postfix_e2e import SmtpError, _reply, wait_queue_empty

LOCAL_DOMAIN = "local.test"
WORKERS = 8
ADDRESSES_PER_WORKER = 24
USERS_PER_WORKER = 6
TTL = 2
# Slack around the expiry window: popauth's clock is read inside the LOGIN
# round trip, the SMTP decision inside the RCPT round trip.
MARGIN = 0.25
FULL_SECONDS = 300.0
QUICK_SECONDS = 8.0
WARMUP_SECONDS = 2.0


@dataclass
class Entry:
    user: str
    # The expiry lies between these two instants (time.monotonic()).
    expires_not_before: float
    expires_not_after: float


@dataclass
class Tally:
    sessions: int = 0
    judged: int = 0
    indeterminate: int = 0
    wrong: int = 0
    wrong_examples: list[str] = field(default_factory=list)
    logins: int = 0
    refused_logins: int = 0
    revokes: int = 0
    blocks: int = 0
    unblocks: int = 0

    def add(self, other: Tally) -> None:
        for name in (
            "sessions",
            "judged",
            "indeterminate",
            "wrong",
            "logins",
            "refused_logins",
            "revokes",
            "blocks",
            "unblocks",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.wrong_examples += other.wrong_examples[: 5 - len(self.wrong_examples)]


class Oracle:
    """What popauth must answer, from the history of one worker's requests."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.blocked: set[str] = set()

    def login(self, address: str, user: str, sent: float, answered: float) -> bool:
        """Whether the LOGIN must succeed; records it."""
        if user in self.blocked:
            return False
        self.entries[address] = Entry(user, sent + TTL, answered + TTL)
        return True

    def revoke(self, address: str) -> None:
        self.entries.pop(address, None)

    def block(self, user: str) -> None:
        self.blocked.add(user)
        for address in [a for a, e in self.entries.items() if e.user == user]:
            del self.entries[address]

    def unblock(self, user: str) -> None:
        self.blocked.discard(user)

    def may_relay(self, address: str, started: float, decided: float) -> bool | None:
        """True or False, or None when the entry may expire during the session."""
        entry = self.entries.get(address)
        if entry is None:
            return False
        if decided < entry.expires_not_before - MARGIN:
            return True
        if started > entry.expires_not_after + MARGIN:
            del self.entries[address]
            return False
        return None


def smtp_rcpt(port: int, source_ip: str, recipient: str) -> int:
    """One SMTP session ending after RCPT (no message); the RCPT reply code."""
    with socket.create_connection(("127.0.0.1", port), 30, (source_ip, 0)) as sock:
        reader = sock.makefile("rb")
        if _reply(reader) != 220:
            raise SmtpError("no 220 banner")
        sock.sendall(b"EHLO client.example\r\n")
        if _reply(reader) != 250:
            raise SmtpError("EHLO refused")
        sock.sendall(b"MAIL FROM:<sender@example.org>\r\n")
        code = _reply(reader)
        if code != 250:
            raise SmtpError(f"MAIL got {code}")
        sock.sendall(f"RCPT TO:<{recipient}>\r\n".encode())
        rcpt = _reply(reader)
        sock.sendall(b"QUIT\r\n")
        _reply(reader)
        reader.close()
    return rcpt


def worker_loop(
    *,
    worker: int,
    server: PopauthServer,
    port: int,
    deadline: Deadline,
    oracle: Oracle,
    tally: Tally,
) -> None:
    chooser = random.Random(1000 + worker + int(deadline.at))
    addresses = [f"127.0.{8 + worker}.{n}" for n in range(1, ADDRESSES_PER_WORKER + 1)]
    users = [f"soak{worker}u{n}" for n in range(USERS_PER_WORKER)]
    while not deadline.passed():
        roll = chooser.random()
        if roll < 0.14:
            address, user = chooser.choice(addresses), chooser.choice(users)
            sent = time.monotonic()
            reply = server.ask(f"LOGIN {address} {user}")[0]
            answered = time.monotonic()
            expected = oracle.login(address, user, sent, answered)
            tally.logins += 1
            if expected != reply.startswith("OK "):
                tally.wrong += 1
                tally.wrong_examples.append(
                    f"LOGIN {address} {user}: {reply}, blocked={not expected}"
                )
            if not expected:
                tally.refused_logins += 1
        elif roll < 0.20:
            address = chooser.choice(addresses)
            server.ask(f"REVOKE {address}")
            oracle.revoke(address)
            tally.revokes += 1
        elif roll < 0.23:
            user = chooser.choice(users)
            reply = server.ask(f"BLOCK {user}")[0]
            if not reply.startswith("OK "):
                raise RuntimeError(f"BLOCK {user}: {reply}")
            oracle.block(user)
            tally.blocks += 1
        elif roll < 0.27:
            user = chooser.choice(users)
            server.ask(f"UNBLOCK {user}")
            oracle.unblock(user)
            tally.unblocks += 1
        else:
            address = chooser.choice(addresses)
            local = chooser.random() < 0.2
            recipient = f"user{worker}@{LOCAL_DOMAIN}" if local else "friend@remote.example"
            started = time.monotonic()
            code = smtp_rcpt(port, address, recipient)
            decided = time.monotonic()
            tally.sessions += 1
            relays = True if local else oracle.may_relay(address, started, decided)
            if relays is None:
                tally.indeterminate += 1
                continue
            tally.judged += 1
            if code != (250 if relays else 550):
                tally.wrong += 1
                tally.wrong_examples.append(
                    f"RCPT {recipient} from {address}: {code}, expected "
                    f"{'250' if relays else '550'}"
                )


def process_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def process_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def run(mode: Mode, workdir: Path) -> BenchResult:
    seconds = QUICK_SECONDS if mode.quick else FULL_SECONDS
    result = BenchResult(
        "B8", f"soak: {seconds:.0f} s of SMTP sessions while logins, revokes, blocks expire"
    )
    workdir.mkdir(parents=True, exist_ok=True)
    server = PopauthServer(
        workdir / "popauth",
        trusted_networks=[],
        local_domains=[LOCAL_DOMAIN],
        local_mailers=["local"],
        log_format="console",
        log_level="warning",
        ttl=TTL,
    )
    (workdir / "popauth").mkdir(parents=True, exist_ok=True)
    server.start()
    postfix = PostfixInstance(
        root=workdir / "postfix",
        smtp_port=free_port(),
        milter=f"unix:{server.milter_path}",
        local_domain=LOCAL_DOMAIN,
    )
    tallies = [Tally() for _ in range(WORKERS)]
    warm = [Tally() for _ in range(WORKERS)]
    # One oracle per worker for the whole run: the warm-up's logins and
    # blocks are still in popauth when the measured part starts.
    oracles = [Oracle() for _ in range(WORKERS)]
    measured: dict[str, Any] = {}
    try:
        postfix.start()
        assert server.process is not None
        pid = server.process.pid
        # Warm-up: a short burst so that threads and caches exist before "start".
        _run_workers(server, postfix.smtp_port, WARMUP_SECONDS, oracles, warm)
        measured["rss_start"] = process_rss_bytes(pid)
        measured["fds_start"] = process_fds(pid)
        began = time.monotonic()
        _run_workers(server, postfix.smtp_port, seconds, oracles, tallies)
        elapsed = time.monotonic() - began
        wait_queue_empty(postfix, 10)
        measured["rss_end"] = process_rss_bytes(pid)
        measured["fds_end"] = process_fds(pid)
        if server.process.poll() is not None:
            raise RuntimeError("popauth died during the soak")
    finally:
        postfix.stop()
        server.stop()
    total = Tally()
    for tally in tallies:
        total.add(tally)
    warm_total = Tally()
    for tally in warm:
        warm_total.add(tally)
    if total.wrong or warm_total.wrong or not total.judged:
        raise RuntimeError(
            f"B8: {total.wrong + warm_total.wrong} wrong verdict(s) in {total.judged} judged: "
            f"{total.wrong_examples + warm_total.wrong_examples}"
        )
    result.metric("sessions", "sessions/s").samples.append(total.sessions / elapsed)
    result.metric("sessions judged", "sessions").samples.append(total.judged)
    result.metric("wrong verdicts", "verdicts").samples.append(total.wrong)
    result.metric("RSS at start", "B").samples.append(measured["rss_start"])
    result.metric("RSS at end", "B").samples.append(measured["rss_end"])
    result.metric("open fds at start", "fds").samples.append(measured["fds_start"])
    result.metric("open fds at end", "fds").samples.append(measured["fds_end"])
    growth = measured["rss_end"] / measured["rss_start"]
    result.checks.append(Check("right verdicts share", 1 - total.wrong / total.judged, ">=", 1.0))
    result.checks.append(Check("RSS end/start", growth, "<=", 1.2))
    result.checks.append(
        Check("open fds end - start", measured["fds_end"] - measured["fds_start"], "<=", 2)
    )
    result.notes += [
        f"{total.sessions} SMTP sessions ({total.judged} judged by the oracle, "
        f"{total.indeterminate} within an expiry window) in {elapsed:.0f} s, {WORKERS} workers",
        f"churn: {total.logins} logins ({total.refused_logins} refused as blocked), "
        f"{total.revokes} revokes, {total.blocks} blocks, {total.unblocks} unblocks, "
        f"ttl {TTL} s",
        f"RSS {measured['rss_start'] / 2**20:.1f} MiB -> {measured['rss_end'] / 2**20:.1f} MiB; "
        f"open fds {measured['fds_start']} -> {measured['fds_end']}",
    ]
    return result


def _run_workers(
    server: PopauthServer,
    port: int,
    seconds: float,
    oracles: list[Oracle],
    tallies: list[Tally],
) -> None:
    deadline = Deadline(seconds)
    failures: list[BaseException] = []

    def guarded(worker: int) -> None:
        try:
            worker_loop(
                worker=worker,
                server=server,
                port=port,
                deadline=deadline,
                oracle=oracles[worker],
                tally=tallies[worker],
            )
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=guarded, args=(w,), daemon=True) for w in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
    if failures:
        raise RuntimeError(f"B8 worker failed: {failures[0]!r}") from failures[0]
