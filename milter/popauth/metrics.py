"""Prometheus metrics, in a registry of popauth's own (no process globals).

The counters always run (a labelled increment costs about a microsecond);
they are only exposed over HTTP when ``metrics_listen`` is set.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

# Decisions take microseconds; the upper buckets catch a slow Redis.
_LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.05, 0.25, 1.0)


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _MetricsServer6(_MetricsServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not written to stderr: the log is popauth's structlog events."""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter(
            "popauth_decisions",
            "Relay decisions by verdict and reason",
            ["verdict", "reason"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "popauth_decision_seconds",
            "Time to reach a relay decision, whitelist lookup included",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ingest_requests = Counter(
            "popauth_ingest_requests",
            "Ingest requests by verb and result",
            ["verb", "result"],
            registry=self.registry,
        )
        self.socketmap_requests = Counter(
            "popauth_socketmap_requests",
            "Socketmap requests by outcome (requests counts them all)",
            ["result"],
            registry=self.registry,
        )
        self.errors = Counter("popauth_errors", "Errors by kind", ["kind"], registry=self.registry)
        self.whitelist_entries = Gauge(
            "popauth_whitelist_entries", "Clients on the whitelist", registry=self.registry
        )
        self._server: _MetricsServer | None = None
        # Labelled children, made once: labels() takes a lock on every call.
        self._children: dict[tuple[Counter, str, str], Any] = {}

    def _child(self, counter: Counter, first: str, second: str) -> Any:
        child = self._children.get((counter, first, second))
        if child is None:
            child = self._children[counter, first, second] = counter.labels(first, second)
        return child

    def decision(self, verdict: str, reason: str) -> Any:
        """The counter of one verdict and reason."""
        return self._child(self.decisions, verdict, reason)

    def socketmap_request(self, result: str) -> Any:
        """The counter of one socketmap outcome."""
        child = self._children.get((self.socketmap_requests, result, ""))
        if child is None:
            child = self.socketmap_requests.labels(result)
            self._children[self.socketmap_requests, result, ""] = child
        return child

    def ingest_request(self, verb: str, result: str) -> Any:
        """The counter of one ingest verb and result."""
        return self._child(self.ingest_requests, verb, result)

    def track_whitelist_size(self, count: Callable[[], int]) -> None:
        """Ask the store for its size at every scrape."""
        self.whitelist_entries.set_function(count)

    def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` on ``host`` (an IP address) and ``port`` in a thread.

        The server is popauth's own, around prometheus_client's WSGI app:
        ``start_http_server`` gives no handle to stop it before
        prometheus-client 0.17 (Debian 12 ships 0.16).
        """
        server_class = _MetricsServer6 if ":" in host else _MetricsServer
        server = make_server(
            host, port, make_wsgi_app(self.registry), server_class, handler_class=_QuietHandler
        )
        threading.Thread(target=server.serve_forever, name="popauth-metrics", daemon=True).start()
        self._server = server

    @property
    def port(self) -> int | None:
        """The port ``/metrics`` is served on, while it is."""
        return None if self._server is None else self._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
