"""The soak: SMTP sessions through a real Postfix while logins, revokes, blocks
and expiries churn, every verdict predicted by an oracle.

Each worker thread owns its own client addresses (127.0.{8+w}.x) and users,
and does everything for them in sequence: LOGIN, REVOKE, BLOCK, UNBLOCK over
the ingest socket, and SMTP sessions (MAIL, then RCPT to a remote or a local
recipient) from those addresses through Postfix to popauth. So the oracle of
each worker sees its own history in order and can predict every verdict
without asking popauth anything.

The oracle (written apart from popauth's code): an address may relay while
one of its users' last LOGIN from it, for a user not blocked at the time,
is younger than ``ttl`` and was not revoked since, neither by REVOKE of the
address nor by BLOCK of that user (an entry holds every user who logged in
from its address, docs/sessions.rst); a local recipient is always
accepted; everything else is refused with 550.
The instant of expiry is only known within the LOGIN's round trip, so a
session that overlaps that window (plus a margin) is counted as
indeterminate and left out; every other session is judged.

``tests/live/test_soak_live.py`` runs it for seconds; the ``soak`` benchmark
for minutes, watching popauth's memory and descriptors as well.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from dataclasses import dataclass, field, fields

from harness.popauth import PopauthServer
from harness.smtp import open_mail_transaction, read_reply

LOCAL_DOMAIN = "local.test"
WORKERS = 8
ADDRESSES_PER_WORKER = 24
USERS_PER_WORKER = 6
# The popauth ttl the oracle assumes (popauth must be started with it).
TTL = 2
# Slack around the expiry window: popauth's clock is read inside the LOGIN
# round trip, the SMTP decision inside the RCPT round trip.
MARGIN = 0.25


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
    # Judged sessions whose RCPT the oracle expected accepted (250) or refused (550).
    judged_accepted: int = 0
    judged_refused: int = 0
    indeterminate: int = 0
    wrong: int = 0
    logins: int = 0
    refused_logins: int = 0
    revokes: int = 0
    blocks: int = 0
    unblocks: int = 0
    wrong_examples: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        for counter in fields(self):
            if counter.name != "wrong_examples":
                setattr(
                    self, counter.name, getattr(self, counter.name) + getattr(other, counter.name)
                )
        self.wrong_examples += other.wrong_examples[: max(0, 5 - len(self.wrong_examples))]


def total(tallies: list[Tally]) -> Tally:
    summed = Tally()
    for tally in tallies:
        summed.add(tally)
    return summed


class Oracle:
    """What popauth must answer, from the history of one worker's requests."""

    def __init__(self) -> None:
        # Per address, each user's own membership.
        self.entries: dict[str, dict[str, Entry]] = {}
        self.blocked: set[str] = set()

    def login(self, address: str, user: str, sent: float, answered: float) -> bool:
        """Whether the LOGIN must succeed; records it."""
        if user in self.blocked:
            return False
        self.entries.setdefault(address, {})[user] = Entry(user, sent + TTL, answered + TTL)
        return True

    def revoke(self, address: str) -> None:
        self.entries.pop(address, None)

    def block(self, user: str) -> None:
        self.blocked.add(user)
        for address, members in list(self.entries.items()):
            members.pop(user, None)
            if not members:
                del self.entries[address]

    def unblock(self, user: str) -> None:
        self.blocked.discard(user)

    def may_relay(self, address: str, started: float, decided: float) -> bool | None:
        """True or False, or None when the last live membership may expire during
        the session."""
        members = self.entries.get(address, {})
        if any(decided < entry.expires_not_before - MARGIN for entry in members.values()):
            return True
        for user, entry in list(members.items()):
            if started > entry.expires_not_after + MARGIN:
                del members[user]
        if not members:
            self.entries.pop(address, None)
            return False
        return None


def smtp_rcpt(port: int, source_ip: str, recipient: str) -> int:
    """One SMTP session ending after RCPT (no message); the RCPT reply code."""
    with socket.create_connection(("127.0.0.1", port), 30, (source_ip, 0)) as sock:
        reader = open_mail_transaction(sock)
        sock.sendall(f"RCPT TO:<{recipient}>\r\n".encode())
        rcpt = read_reply(reader)
        sock.sendall(b"QUIT\r\n")
        read_reply(reader)
        reader.close()
    return rcpt


def worker_loop(
    *, worker: int, server: PopauthServer, port: int, until: float, oracle: Oracle, tally: Tally
) -> None:
    """One worker's churn and sessions until ``until`` (time.monotonic())."""
    chooser = random.Random(1000 + worker + int(until))
    addresses = [f"127.0.{8 + worker}.{n}" for n in range(1, ADDRESSES_PER_WORKER + 1)]
    users = [f"soak{worker}u{n}" for n in range(USERS_PER_WORKER)]
    while time.monotonic() < until:
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
            judge(tally, relays, code, f"RCPT {recipient} from {address}")


def judge(tally: Tally, relays: bool | None, code: int, session: str) -> None:
    """Tally one session's RCPT reply against what the oracle expects."""
    if relays is None:
        tally.indeterminate += 1
        return
    tally.judged += 1
    if relays:
        tally.judged_accepted += 1
    else:
        tally.judged_refused += 1
    expected = 250 if relays else 550
    if code != expected:
        tally.wrong += 1
        tally.wrong_examples.append(f"{session}: {code}, expected {expected}")


def run_workers(
    server: PopauthServer, port: int, seconds: float, oracles: list[Oracle], tallies: list[Tally]
) -> None:
    """Every worker for ``seconds``, each with its own oracle and tally; raises
    the first failure of a worker (not a wrong verdict: those are tallied)."""
    until = time.monotonic() + seconds
    failures: list[BaseException] = []

    def guarded(worker: int) -> None:
        try:
            worker_loop(
                worker=worker,
                server=server,
                port=port,
                until=until,
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
        raise RuntimeError(f"soak worker failed: {failures[0]!r}") from failures[0]
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError("a soak worker did not finish in time")
