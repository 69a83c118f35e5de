"""The ingest endpoint: a UNIX stream socket served by asyncio in its own thread.

It runs beside libmilter, which owns the main thread and the signals, so it
has its own event loop (``popauth.unixserver``) and is stopped explicitly
after the milter returns.
Each client gets a bounded line length, an idle timeout per request, and a
cap on concurrent clients; bad input gets an ``ERR`` reply and changes
nothing, and no client can stop the endpoint from serving the others.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from popauth.accounts import BlockList, UsageLedger
from popauth.addresses import IPAddress, WhitelistKeying
from popauth.ingest import protocol
from popauth.ingest.protocol import (
    ADMINISTRATIVE,
    STATE_CHANGING,
    ErrorCode,
    ProtocolError,
    Request,
    Verb,
)
from popauth.metrics import Metrics
from popauth.store import StoreUnavailable, WhitelistStore
from popauth.unixserver import UnixStreamServer

_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(connection: socket.socket) -> Peer:
    raw = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Peer(pid, uid, gid)


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    """Which peers may change the whitelist (root and our own user always may)."""

    uids: frozenset[int]
    gids: frozenset[int]

    @classmethod
    def of(cls, users: Iterable[str], groups: Iterable[str]) -> PeerPolicy:
        from popauth.sockets import resolve_gid

        uids = {0, os.getuid()}
        uids.update(int(u) if u.isdigit() else pwd.getpwnam(u).pw_uid for u in users)
        return cls(frozenset(uids), frozenset(resolve_gid(g) for g in groups))

    def may_change(self, peer: Peer) -> bool:
        return peer.uid in self.uids or peer.gid in self.gids

    @staticmethod
    def may_administer(peer: Peer) -> bool:
        return peer.uid in (0, os.getuid())


@dataclass(frozen=True, slots=True)
class IngestLimits:
    timeout: float = 5.0
    max_clients: int = 256


class IngestServer(UnixStreamServer):
    def __init__(
        self,
        *,
        path: Path,
        mode: int,
        group: str,
        store: WhitelistStore,
        keying: WhitelistKeying,
        peers: PeerPolicy,
        limits: IngestLimits,
        blocklist: BlockList,
        ledger: UsageLedger,
        metrics: Metrics,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        super().__init__(
            path=path,
            mode=mode,
            group=group,
            max_clients=limits.max_clients,
            stream_limit=protocol.MAX_LINE,
            blocking_calls=store.may_block,
            thread_name="popauth-ingest",
            log=log.bind(door="ingest"),
        )
        self._store = store
        self._keying = keying
        self._peers = peers
        self._limits = limits
        self._blocklist = blocklist
        self._ledger = ledger
        self._metrics = metrics

    # --- one client ------------------------------------------------------

    async def refuse_busy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer.get_extra_info("socket"))
        self._log.warning("ingest_busy", peer_uid=peer.uid, clients=self.clients)
        writer.write(protocol.error(ErrorCode.BUSY, "too many clients, try again"))

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = peer_of(writer.get_extra_info("socket"))
        try:
            while await self._serve_request(reader, writer, peer):
                pass
        except (ConnectionError, BrokenPipeError):
            self._log.info("ingest_client_gone", peer_uid=peer.uid)

    async def _serve_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> bool:
        """Read and answer one request; False when the connection should end."""
        try:
            # asyncio.timeout, not wait_for: no extra task for every request.
            async with asyncio.timeout(self._limits.timeout):
                line = await reader.readuntil(b"\n")
        except TimeoutError:
            self._log.info("ingest_timeout", peer_uid=peer.uid)
            writer.write(protocol.error(ErrorCode.TIMEOUT, "no complete request in time"))
            return False
        except asyncio.IncompleteReadError as incomplete:
            if incomplete.partial:
                # The client hung up mid-line: a half request is never applied.
                self._log.warning("ingest_partial_request", peer_uid=peer.uid)
            return False
        except asyncio.LimitOverrunError:
            self._log.warning("ingest_rejected", peer_uid=peer.uid, error="too-long")
            writer.write(
                protocol.error(ErrorCode.TOO_LONG, f"request longer than {protocol.MAX_LINE} bytes")
            )
            return False
        # A slow store must not hold up every other client of the loop.
        reply, keep_open = await self.call(self.answer, line, peer)
        writer.write(reply)
        await writer.drain()
        return keep_open

    def answer(self, line: bytes, peer: Peer) -> tuple[bytes, bool]:
        """The reply to one request line, and whether to keep the connection."""
        try:
            request = protocol.parse_request(line)
        except ProtocolError as problem:
            self._metrics.ingest_requests.labels("invalid", problem.code.value).inc()
            self._log.warning("ingest_rejected", peer_uid=peer.uid, error=problem.code.value)
            return protocol.error(problem.code, problem.reason), True
        verb = request.verb.value
        refusal = self._refusal(request, peer)
        if refusal is not None:
            self._metrics.ingest_requests.labels(verb, "forbidden").inc()
            self._log.warning("ingest_forbidden", verb=verb, peer_uid=peer.uid, peer_gid=peer.gid)
            return protocol.error(ErrorCode.FORBIDDEN, refusal), True
        try:
            reply = self._execute(request, peer)
        except StoreUnavailable as failure:
            self._metrics.ingest_requests.labels(verb, "unavailable").inc()
            self._metrics.errors.labels("store_unavailable").inc()
            self._log.error("ingest_store_unavailable", verb=verb, error=str(failure))
            return protocol.error(ErrorCode.UNAVAILABLE, "whitelist store unavailable"), True
        result = reply.split(b" ", 1)[0].rstrip(b"\n").decode().lower()
        self._metrics.ingest_requests.labels(verb, result).inc()
        return reply, request.verb is not Verb.QUIT

    def _refusal(self, request: Request, peer: Peer) -> str | None:
        if request.verb in STATE_CHANGING and not self._peers.may_change(peer):
            return "this peer may not change the whitelist"
        if request.verb in ADMINISTRATIVE and not self._peers.may_administer(peer):
            return "only root and popauth's own user may change the block list"
        return None

    def _execute(self, request: Request, peer: Peer) -> bytes:
        verb = request.verb
        if verb is Verb.PING:
            return protocol.ok("pong")
        if verb is Verb.QUIT:
            return protocol.ok("bye")
        if verb is Verb.STATS:
            return protocol.ok(protocol.stats_fields(self._store.stats()))
        if verb is Verb.LIST:
            return protocol.multi_line(
                protocol.format_grant(grant, self._keying.describe(grant.address))
                for grant in self._store.entries()
            )
        if verb is Verb.BLOCKED:
            return protocol.multi_line(f"user={user}" for user in self._blocklist.users())
        if verb is Verb.REPORT:
            return protocol.multi_line(
                protocol.format_usage(user, usage) for user, usage in self._ledger.pop_first_users()
            )
        if request.address is None:
            return self._execute_for_user(verb, request.user, peer)
        key = self._keying.key_address(request.address)
        described = self._keying.describe(key)
        if verb is Verb.LOGIN:
            return self._login(key, described, request.user, peer)
        if verb is Verb.REVOKE:
            removed = self._store.revoke(key)
            self._log.info(
                "revoke", client_ip=described, found=removed is not None, peer_uid=peer.uid
            )
            if removed is None:
                return protocol.not_found(described)
            return protocol.ok(protocol.format_grant(removed, described))
        grant = self._store.lookup(key)
        if grant is None:
            return protocol.not_found(described)
        return protocol.ok(protocol.format_grant(grant, described))

    def _login(self, key: IPAddress, described: str, user: str, peer: Peer) -> bytes:
        if user and user in self._blocklist:
            self._log.warning("login_refused_blocked", client_ip=described, user=user)
            return protocol.error(ErrorCode.BLOCKED, f"user {user} is blocked")
        outcome = self._store.grant(key, user)
        if outcome.evicted is not None:
            self._log.warning(
                "whitelist_full_evicted",
                evicted=self._keying.describe(outcome.evicted.address),
                evicted_user=outcome.evicted.user,
            )
        self._log.info(
            "login",
            client_ip=described,
            user=user or None,
            renewed=outcome.renewed,
            peer_uid=peer.uid,
        )
        renewed = "yes" if outcome.renewed else "no"
        return protocol.ok(f"{protocol.format_grant(outcome.grant, described)} renewed={renewed}")

    def _execute_for_user(self, verb: Verb, user: str, peer: Peer) -> bytes:
        if verb is Verb.UNBLOCK:
            unblocked = self._blocklist.remove(user)
            self._log.info("unblock", user=user, found=unblocked, peer_uid=peer.uid)
            return protocol.ok(f"user={user}") if unblocked else protocol.not_found_user(user)
        newly_blocked = None
        if verb is Verb.BLOCK:
            # Block first: a login racing with this cannot slip in after the revoke.
            newly_blocked = self._blocklist.add(user)
        revoked = self._store.revoke_user(user)
        addresses = [self._keying.describe(grant.address) for grant in revoked]
        self._log.info(
            verb.value.lower(),
            user=user,
            revoked=addresses,
            blocked=newly_blocked,
            peer_uid=peer.uid,
        )
        fields = f"user={user} revoked={len(revoked)}"
        if newly_blocked is not None:
            fields += " blocked=" + ("new" if newly_blocked else "already")
        return protocol.ok(fields)
