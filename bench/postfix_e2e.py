"""B2: messages per second through a private Postfix, 8 concurrent SMTP clients.

Set-ups, all running at once on their own ports and measured in turn:

- ``no-milter``: Postfix alone, relay restrictions as in the popauth
  deployment minus the milter (the cidr table answers OK for everyone):
  every message is accepted, so it is the upper bound;
- ``popauth``: the same plus popauth as ``smtpd_milters`` (default logging);
- ``popauth[warning]``: the same with popauth at ``log_level = "warning"``;
- ``cidr``: no milter, Postfix decides alone with the same verdicts: the
  ``smtpd_relay_restrictions`` of ``contrib/postfix/socketmap-main.cf`` with
  a ``cidr:`` table holding the whitelist in place of popauth's socketmap;
- ``socketmap``: those restrictions as shipped: Postfix asks popauth's
  socketmap door only for mail that would be relayed
  (``permit_auth_destination`` comes first), and a ``pipemap:`` passes only
  the client address on to popauth, not the client name;
- ``socketmap[name-lookup]``: the same with the plain socketmap lookup
  (Postfix before 3.7): one more round trip, for the client name;
- ``policy``: the ``smtpd_relay_restrictions`` of
  ``contrib/postfix/policy-main.cf``: after ``permit_auth_destination``,
  Postfix asks popauth's policy door (``check_policy_service``) to judge
  each relayed recipient by the milter's decision;
- ``minimal-milter``: in place of popauth, the least pymilter milter that
  gives the same verdicts (:mod:`bench.verdict_milter`: the whitelist in a
  set, a local-domain test, 550 at RCPT), for the target that popauth's
  milter costs Postfix no more than such a milter.

One message per SMTP connection; the mix cycles through whitelisted
(relaying), local-recipient (inbound) and refused (relaying stranger)
clients, each from its own loopback address. A refused transaction ends at
RCPT; it still counts as one transaction handled. Between two runs the
harness waits for the previous instance's queue to drain, so that
deliveries of one set-up do not eat into the next one's run.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from bench.common import BenchResult, Check, Deadline, Mode, drive, own_senders_file, rounds
from bench.milter_protocol import NoopMilterProcess
from harness.popauth import PopauthServer
from harness.ports import free_port
from harness.postfix import PostfixInstance, contrib_policy_relay_restrictions
from harness.smtp import SENDER, SmtpError, open_mail_transaction, read_reply

LOCAL_DOMAIN = "local.test"
CLIENTS = 8
CLASSES = ("whitelisted", "local", "whitelisted", "local", "refused")
SOURCES = {
    "whitelisted": [f"127.0.1.{n}" for n in range(1, 41)],
    "local": [f"127.0.2.{n}" for n in range(1, 41)],
    "refused": [f"127.0.3.{n}" for n in range(1, 41)],
}
RECIPIENT = {"whitelisted": "friend@remote.example", "local": f"user@{LOCAL_DOMAIN}"}
BODY = (
    b"From: Sender <sender@example.org>\r\n"
    b"To: Friend <friend@remote.example>\r\n"
    b"Subject: popauth benchmark\r\n"
    b"Message-ID: <bench@example.org>\r\n"
    b"\r\n" + b"Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n" * 12 + b".\r\n"
)
QUEUE_SUBDIRS = ("maildrop", "incoming", "active", "deferred", "hold")


def transaction(port: int, source_ip: str, recipient: str) -> int:
    """One SMTP connection with one message; the RCPT reply code."""
    with socket.create_connection(("127.0.0.1", port), 30, (source_ip, 0)) as sock:
        reader = open_mail_transaction(sock)
        sock.sendall(f"RCPT TO:<{recipient}>\r\n".encode())
        rcpt = read_reply(reader)
        if rcpt == 250:
            sock.sendall(b"DATA\r\n")
            if read_reply(reader) != 354:
                raise SmtpError("DATA refused")
            sock.sendall(BODY)
            code = read_reply(reader)
            if code != 250:
                raise SmtpError(f"message got {code}")
        sock.sendall(b"QUIT\r\n")
        read_reply(reader)
        reader.close()
    return rcpt


def queue_length(instance: PostfixInstance) -> int:
    total = 0
    for name in QUEUE_SUBDIRS:
        for _, _, files in os.walk(instance.queue_dir / name):
            total += len(files)
    return total


def wait_queue_empty(instance: PostfixInstance, seconds: float = 60.0) -> None:
    deadline = Deadline(seconds)
    while queue_length(instance) and not deadline.passed():
        time.sleep(0.05)


def whitelist_cidr(path: Path) -> Path:
    lines = [f"{ip}/32 OK" for ip in SOURCES["whitelisted"]]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


CONTRIB_CF = Path(__file__).parents[1] / "contrib" / "postfix" / "socketmap-main.cf"
PRODUCTION_SOCKET = "/var/spool/postfix/popauth/socketmap.sock"


def contrib_relay_restrictions() -> list[str]:
    """``smtpd_relay_restrictions`` of contrib/postfix/socketmap-main.cf, one per line."""
    text = CONTRIB_CF.read_text()
    match = re.search(r"^smtpd_relay_restrictions =\n((?:[ \t]+\S.*\n)+)", text, re.M)
    if match is None:
        raise RuntimeError(f"no smtpd_relay_restrictions in {CONTRIB_CF}")
    return [line.strip() for line in match.group(1).splitlines()]


def joined(restrictions: list[str], socket_path: Path, client_check: str | None = None) -> str:
    """One line; with ``client_check`` in place of the shipped check_client_access."""
    lines = [
        f"check_client_access {client_check},"
        if client_check and line.startswith("check_client_access ")
        else line
        for line in restrictions
    ]
    return " ".join(lines).replace(PRODUCTION_SOCKET, str(socket_path))


def start_popauth(directory: Path, **settings: Any) -> PopauthServer:
    """popauth on the product defaults but two: every login's sender is its
    own (as a user's is), and no relay budget, so that a whitelisted message
    is accepted at MAIL as the minimal milter accepts it (relay-budget-cost
    measures the budget through Postfix side by side)."""
    directory.mkdir(parents=True, exist_ok=True)
    owned = own_senders_file(directory, len(SOURCES["whitelisted"]), SENDER)
    server = PopauthServer(
        directory,
        **{
            "trusted_networks": [],
            "local_domains": [LOCAL_DOMAIN],
            "local_mailers": ["local"],
            "log_format": "console",
            "pop_first_sender_addresses": str(owned),
            "pop_first_max_recipients": "",
            **settings,
        },
    ).start()
    for index, ip in enumerate(SOURCES["whitelisted"]):
        reply = server.ask(f"LOGIN {ip} user{index:03d}")
        if not reply or not reply[0].startswith("OK"):
            raise RuntimeError(f"could not whitelist {ip}: {reply}")
    return server


def minimal_milter(directory: Path) -> NoopMilterProcess:
    """The minimal milter with popauth's verdicts (not started yet)."""
    directory.mkdir(parents=True, exist_ok=True)
    whitelist = directory / "whitelist.txt"
    whitelist.write_text("\n".join(SOURCES["whitelisted"]) + "\n", encoding="ascii")
    return NoopMilterProcess(
        directory, module="bench.verdict_milter", arguments=[str(whitelist), LOCAL_DOMAIN]
    )


EXPECTED = {
    "no-milter": {"whitelisted": 250, "local": 250, "refused": 250},
    "popauth": {"whitelisted": 250, "local": 250, "refused": 550},
    "popauth[warning]": {"whitelisted": 250, "local": 250, "refused": 550},
    "cidr": {"whitelisted": 250, "local": 250, "refused": 550},
    "socketmap": {"whitelisted": 250, "local": 250, "refused": 550},
    "socketmap[name-lookup]": {"whitelisted": 250, "local": 250, "refused": 550},
    "policy": {"whitelisted": 250, "local": 250, "refused": 550},
    "minimal-milter": {"whitelisted": 250, "local": 250, "refused": 550},
}


def run(mode: Mode, workdir: Path) -> BenchResult:
    result = BenchResult("B2", f"Postfix end to end: messages/s, {CLIENTS} SMTP clients")
    workdir.mkdir(parents=True, exist_ok=True)
    servers = {
        "popauth": start_popauth(workdir / "popauth-info", log_level="info"),
        "popauth[warning]": start_popauth(workdir / "popauth-warning", log_level="warning"),
        "socketmap": start_popauth(
            workdir / "popauth-socketmap",
            log_level="info",
            socketmap_socket=str(workdir / "popauth-socketmap" / "socketmap.sock"),
            # As contrib/postfix/socketmap-main.cf says: smtpd's group, which
            # exempts smtpd from the per-uid connection limit.
            socketmap_socket_mode="0660",
            socketmap_socket_group="postfix",
        ),
        "policy": start_popauth(
            workdir / "popauth-policy",
            log_level="info",
            policy_socket=str(workdir / "popauth-policy" / "policy.sock"),
            # As contrib/postfix/policy-main.cf says: smtpd's group.
            policy_socket_mode="0660",
            policy_socket_group="postfix",
        ),
    }
    socketmap = workdir / "popauth-socketmap" / "socketmap.sock"
    cidr = whitelist_cidr(workdir / "whitelist.cidr")
    minimal = minimal_milter(workdir / "minimal-milter")
    shipped = contrib_relay_restrictions()
    if PRODUCTION_SOCKET not in " ".join(shipped):
        raise RuntimeError(f"{CONTRIB_CF} does not use {PRODUCTION_SOCKET}")
    instances = {
        "no-milter": PostfixInstance(
            root=workdir / "pf-none", smtp_port=free_port(), milter=None, local_domain=LOCAL_DOMAIN
        ),
        "popauth": PostfixInstance(
            root=workdir / "pf-popauth",
            smtp_port=free_port(),
            milter=f"unix:{servers['popauth'].milter_path}",
            local_domain=LOCAL_DOMAIN,
        ),
        "popauth[warning]": PostfixInstance(
            root=workdir / "pf-popauth-warning",
            smtp_port=free_port(),
            milter=f"unix:{servers['popauth[warning]'].milter_path}",
            local_domain=LOCAL_DOMAIN,
        ),
        "cidr": PostfixInstance(
            root=workdir / "pf-cidr",
            smtp_port=free_port(),
            milter=None,
            local_domain=LOCAL_DOMAIN,
            relay_restrictions=joined(shipped, socketmap, f"cidr:{cidr}"),
        ),
        "socketmap": PostfixInstance(
            root=workdir / "pf-socketmap",
            smtp_port=free_port(),
            milter=None,
            local_domain=LOCAL_DOMAIN,
            relay_restrictions=joined(shipped, socketmap),
        ),
        "socketmap[name-lookup]": PostfixInstance(
            root=workdir / "pf-socketmap-names",
            smtp_port=free_port(),
            milter=None,
            local_domain=LOCAL_DOMAIN,
            relay_restrictions=joined(shipped, socketmap, f"socketmap:unix:{socketmap}:popauth"),
        ),
        "policy": PostfixInstance(
            root=workdir / "pf-policy",
            smtp_port=free_port(),
            milter=None,
            local_domain=LOCAL_DOMAIN,
            relay_restrictions=contrib_policy_relay_restrictions(
                workdir / "popauth-policy" / "policy.sock"
            ),
        ),
        "minimal-milter": PostfixInstance(
            root=workdir / "pf-minimal-milter",
            smtp_port=free_port(),
            milter=f"unix:{minimal.milter_path}",
            local_domain=LOCAL_DOMAIN,
        ),
    }
    replies: dict[str, dict[tuple[str, int], int]] = {name: {} for name in instances}
    started: list[PostfixInstance] = []
    try:
        minimal.start()
        for instance in instances.values():
            instance.start()
            started.append(instance)

        def measure(name: str, seconds: float) -> None:
            instance = instances[name]
            seen = replies[name]

            def one(worker: int, iteration: int) -> None:
                kind = CLASSES[(iteration * CLIENTS + worker) % len(CLASSES)]
                sources = SOURCES[kind]
                source = sources[(iteration * CLIENTS + worker) % len(sources)]
                recipient = RECIPIENT.get(kind, "friend@remote.example")
                code = transaction(instance.smtp_port, source, recipient)
                seen[(kind, code)] = seen.get((kind, code), 0) + 1

            wait_queue_empty(instance)
            outcome = drive(CLIENTS, abs(seconds), one, max_operations=100_000)
            if outcome.errors:
                raise RuntimeError(f"B2 {name}: {outcome.errors} errors: {outcome.first_error}")
            if seconds > 0:
                result.metric(name, "messages/s").samples.append(outcome.rate)
            wait_queue_empty(instance)

        rounds(mode, list(instances), measure)
    finally:
        for instance in started:
            instance.stop()
        for server in servers.values():
            server.stop()
        minimal.stop()

    for name, expected in EXPECTED.items():
        for (kind, code), count in replies[name].items():
            if code != expected[kind]:
                raise RuntimeError(f"B2 {name}: {count} x RCPT {code} for {kind} clients")
    checks = (
        ("popauth/no-milter", "popauth", "no-milter", 0.85),
        ("popauth/cidr", "popauth", "cidr", 0.9),
        ("socketmap/cidr", "socketmap", "cidr", 0.97),
        ("policy/cidr", "policy", "cidr", 0.95),
        ("popauth/minimal-milter", "popauth", "minimal-milter", 1.0),
    )
    for ratio_name, top, bottom, target in checks:
        ratio = result.ratio(ratio_name, top, bottom)
        result.checks.append(Check(ratio.name, ratio.stats().median, ">=", target))
    result.ratio("popauth[warning]/no-milter", "popauth[warning]", "no-milter")
    result.ratio("popauth[warning]/cidr", "popauth[warning]", "cidr")
    result.ratio("cidr/no-milter", "cidr", "no-milter")
    result.ratio("socketmap[name-lookup]/cidr", "socketmap[name-lookup]", "cidr")
    result.ratio("policy/socketmap", "policy", "socketmap")
    result.notes += [
        "mix per 5 connections: 2 whitelisted relaying, 2 inbound to a local recipient, "
        "1 refused relaying (ends at RCPT); no-milter accepts all (open relay baseline)",
        "cidr and socketmap: the smtpd_relay_restrictions of "
        "contrib/postfix/socketmap-main.cf (local mail is permitted before any lookup)",
        "policy: those of contrib/postfix/policy-main.cf (likewise: local mail is "
        "permitted before popauth is asked)",
        "SMTP AUTH not exercised (whitelist and local only)",
        "RCPT replies, popauth: "
        + ", ".join(f"{k}:{c}={n}" for (k, c), n in sorted(replies["popauth"].items())),
    ]
    return result
