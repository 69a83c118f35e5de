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
from collections.abc import Callable, Iterable
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
        self._connections: set[_IngestConnection] = set()

    # --- connections ----------------------------------------------------

    def protocol_factory(self) -> Callable[[], asyncio.Protocol]:
        return lambda: _IngestConnection(self)

    def close_connections(self) -> None:
        for connection in list(self._connections):
            connection.close()

    @property
    def limits(self) -> IngestLimits:
        return self._limits

    @property
    def log(self) -> structlog.typing.FilteringBoundLogger:
        return self._log

    def answer(self, line: bytes, peer: Peer) -> tuple[bytes, bool]:
        """The reply to one request line, and whether to keep the connection."""
        try:
            request = protocol.parse_request(line)
        except ProtocolError as problem:
            self._metrics.ingest_request("invalid", problem.code.value).inc()
            self._log.warning("ingest_rejected", peer_uid=peer.uid, error=problem.code.value)
            return protocol.error(problem.code, problem.reason), True
        verb = request.verb.value
        refusal = self._refusal(request, peer)
        if refusal is not None:
            self._metrics.ingest_request(verb, "forbidden").inc()
            self._log.warning("ingest_forbidden", verb=verb, peer_uid=peer.uid, peer_gid=peer.gid)
            return protocol.error(ErrorCode.FORBIDDEN, refusal), True
        try:
            reply = self._execute(request, peer)
        except StoreUnavailable as failure:
            self._metrics.ingest_request(verb, "unavailable").inc()
            self._metrics.errors.labels("store_unavailable").inc()
            self._log.error("ingest_store_unavailable", verb=verb, error=str(failure))
            return protocol.error(ErrorCode.UNAVAILABLE, "whitelist store unavailable"), True
        result = reply.split(b" ", 1)[0].rstrip(b"\n").decode().lower()
        self._metrics.ingest_request(verb, result).inc()
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


_TOO_LONG = protocol.error(ErrorCode.TOO_LONG, f"request longer than {protocol.MAX_LINE} bytes")
_TIMEOUT = protocol.error(ErrorCode.TIMEOUT, "no complete request in time")
_BUSY = protocol.error(ErrorCode.BUSY, "too many clients, try again")
_INTERNAL = protocol.error(ErrorCode.INTERNAL, "internal error, nothing changed")


class _IngestConnection(asyncio.Protocol):
    """One client: lines in, replies out, in order, one request at a time.

    Each complete line restarts the clock: a client has ``timeout`` seconds
    for every request, including the first. A line longer than MAX_LINE
    ends the connection (it cannot be resynchronised safely); a client that
    hangs up mid-line changes nothing.
    """

    def __init__(self, server: IngestServer) -> None:
        self._server = server
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._peer = Peer(0, -1, -1)
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        # A request waiting on a store that may block; later lines wait too.
        self._in_flight = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._peer = peer_of(transport.get_extra_info("socket"))
        server = self._server
        server._connections.add(self)
        if not server.connection_opened():
            server.log.warning("ingest_busy", peer_uid=self._peer.uid, clients=server.clients)
            self._finish(_BUSY)
            return
        self._restart_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._server._connections.discard(self)
        self._server.connection_closed()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._serve_lines()

    def eof_received(self) -> bool:
        if self._buffer:
            self._server.log.warning("ingest_partial_request", peer_uid=self._peer.uid)
        self._buffer.clear()
        return False  # close our side too

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _restart_clock(self) -> None:
        # One timer per connection, moved lazily: a busy client must not pay
        # for cancelling and making a timer with every request.
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self._server.limits.timeout
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._check_clock)

    def _check_clock(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._check_clock)
            return
        self._timer = None
        self._server.log.info("ingest_timeout", peer_uid=self._peer.uid)
        self._finish(_TIMEOUT)

    def _finish(self, reply: bytes) -> None:
        """Send a last reply and close."""
        self._buffer.clear()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(reply)
            self._transport.close()

    def _serve_lines(self) -> None:
        transport = self._transport
        while not self._in_flight and transport is not None and not transport.is_closing():
            end = self._buffer.find(b"\n")
            if end < 0 and len(self._buffer) <= protocol.MAX_LINE:
                return
            if end < 0 or end >= protocol.MAX_LINE:
                self._server.log.warning(
                    "ingest_rejected", peer_uid=self._peer.uid, error="too-long"
                )
                self._finish(_TOO_LONG)
                return
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            self._restart_clock()
            if self._server.blocking_calls:
                # A slow store must not hold up every other client of the loop.
                self._in_flight = True
                transport.pause_reading()
                done = asyncio.get_running_loop().run_in_executor(
                    None, self._server.answer, line, self._peer
                )
                done.add_done_callback(self._answered)
                return
            self._reply(*self._server.answer(line, self._peer))

    def _answered(self, done: asyncio.Future[tuple[bytes, bool]]) -> None:
        self._in_flight = False
        if self._transport is None or self._transport.is_closing():
            return
        if done.exception() is not None:
            self._server.log.error("ingest_failed", error=repr(done.exception()))
            self._reply(_INTERNAL, True)
        else:
            self._reply(*done.result())
        self._transport.resume_reading()
        self._serve_lines()

    def _reply(self, reply: bytes, keep_open: bool) -> None:
        assert self._transport is not None
        self._transport.write(reply)
        if not keep_open:
            self._transport.close()
