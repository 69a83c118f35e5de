"""Prometheus metrics, in a registry of popauth's own (no process globals).

The counters always run (a labelled increment costs about a microsecond);
they are only exposed over HTTP when ``metrics_listen`` is set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Decisions take microseconds; the upper buckets catch a slow Redis.
_LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.05, 0.25, 1.0)


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
        self._server: Any = None
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
        started = start_http_server(port, addr=host, registry=self.registry)
        self._server = started[0] if isinstance(started, tuple) else None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
