"""Part of B5: the milter's decision latency with a large whitelist, while snapshots are written.

A real ``popauth serve`` starts from a snapshot of N entries (10^6 in the
full run) and saves its snapshot every second, so that it is writing one
most of the time (a save of 10^6 entries takes seconds). One MTA client
(``bench.milter_protocol``'s sessions, one at a time, about 200 a second)
times the *deciding* exchange of each session: MAIL for a whitelisted
client (popauth answers ACCEPT there after its lookup), RCPT for a stranger
relaying (550 after its lookup missed). Each sample is put in or out of a
snapshot by the server's own ``snapshot_saved`` events (when each ended and
how long it took), so the two figures come from the same run, side by side.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from bench.milter_protocol import (
    CONTINUE,
    P_NOMAIL,
    P_NORCPT,
    P_NR_CONN,
    QUIT,
    REPLYCODE,
    WHITELISTED_IPS,
    Script,
    negotiate,
    read_packet,
    script,
)
from harness.popauth import PopauthServer
from popauth.store.base import Grant
from popauth.store.snapshot import write_snapshot

TTL = 900
BULK_BASE = int(ipaddress.IPv4Address("11.0.0.0"))
STRANGER = "203.0.113.77"


@dataclass(frozen=True)
class Sample:
    began: float  # epoch seconds
    milliseconds: float
    kind: str


@dataclass
class Outcome:
    # Milliseconds of each decision made while a snapshot was being written.
    during: list[float]
    between: list[float]
    snapshot_seconds: list[float]


def make_snapshot(path: Path, entries: int) -> None:
    now = time.time()
    grants = [
        Grant(ipaddress.IPv4Address(BULK_BASE + n), f"user{n // 2}", now - 60, now + TTL - 60)
        for n in range(entries - len(WHITELISTED_IPS))
    ]
    grants += [
        Grant(ipaddress.IPv4Address(ip), f"user{n:03d}", now, now + TTL)
        for n, ip in enumerate(WHITELISTED_IPS)
    ]
    write_snapshot(path, grants, now)


def decision_milliseconds(path: str, plan: Script) -> float:
    """One session; the time of the exchange whose reply decides it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        protocol = negotiate(sock, path, timeout=30)
        if protocol & (P_NOMAIL | P_NORCPT):
            raise RuntimeError("popauth skips MAIL or RCPT: nothing to time")
        sock.sendall(plan.connect)
        # popauth asks for no CONNECT reply when nothing can be decided there.
        if not protocol & P_NR_CONN and read_packet(sock)[0] != CONTINUE:
            raise RuntimeError("popauth decided at CONNECT")
        began = time.perf_counter()
        sock.sendall(plan.mail)
        reply, _ = read_packet(sock)
        if reply == CONTINUE:
            began = time.perf_counter()
            sock.sendall(plan.rcpt)
            reply, data = read_packet(sock)
            if reply == REPLYCODE:
                reply = data[:1]
        elapsed = (time.perf_counter() - began) * 1000
        sock.sendall(QUIT)
    expected = b"a" if plan.kind == "whitelisted" else b"5"
    if reply != expected:
        raise RuntimeError(f"{plan.kind} client got {reply!r}, not {expected!r}")
    return elapsed


def snapshot_windows(server: PopauthServer) -> list[tuple[float, float]]:
    windows = []
    for event in server.events("snapshot_saved"):
        ended = datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
        end = ended.timestamp()
        windows.append((end - float(event["seconds"]), end))
    return windows


def measure(workdir: Path, entries: int, seconds: float) -> Outcome:
    workdir.mkdir(parents=True, exist_ok=True)
    snapshot = workdir / "state" / "whitelist.json"
    make_snapshot(snapshot, entries)
    server = PopauthServer(
        workdir,
        snapshot_path=str(snapshot),
        snapshot_interval=1,
        max_entries=entries + 1000,
        ttl=TTL,
        log_format="json",
        log_level="info",
        # One whitelisted client sends all along: accepted at MAIL, no budget.
        pop_first_max_recipients="",
    )
    plans = [script("whitelisted", WHITELISTED_IPS[0], 40001), script("refused", STRANGER, 40002)]
    samples: list[Sample] = []
    try:
        server.start(timeout=300)
        restored = server.events("snapshot_restored")
        if not restored or restored[0]["restored"] != entries:
            raise RuntimeError(f"snapshot not restored whole: {restored}")
        deadline = time.monotonic() + seconds
        index = 0
        while time.monotonic() < deadline:
            plan = plans[index % len(plans)]
            began = time.time()
            samples.append(
                Sample(began, decision_milliseconds(str(server.milter_path), plan), plan.kind)
            )
            index += 1
            time.sleep(0.005)
    finally:
        server.stop(timeout=120)
    windows = snapshot_windows(server)
    during: list[float] = []
    between: list[float] = []
    for sample in samples:
        inside = any(start <= sample.began <= end for start, end in windows)
        (during if inside else between).append(sample.milliseconds)
    return Outcome(during, between, [end - start for start, end in windows])
