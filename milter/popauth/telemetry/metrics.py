"""Prometheus metrics, in a registry of popauth's own (no process globals).

The counters always run; they are only exposed over HTTP when
``metrics_listen`` is set.

The counts taken on every request (relay decisions and their latency,
ingest and socketmap requests) are plain numbers under one lock, read by a
collector when Prometheus scrapes (prometheus_client's custom collector
interface): a labelled ``Counter`` costs a ``labels()`` lookup, several
calls and a lock per increment, and a ``Histogram`` as much again, which
was a tenth of popauth's own work per milter session.
"""

from __future__ import annotations

import bisect
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

# Decisions take microseconds; the upper buckets catch a slow Redis.
_LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.05, 0.25, 1.0)


_REQUESTS = ("requests",)
# The socketmap's results: every answered request counts under "requests"
# too; "perm", "busy" and "timeouts" also count refusals before a request.
SOCKETMAP_RESULTS = (
    "requests",
    "hits",
    "misses",
    "not_an_address",
    "temp",
    "perm",
    "busy",
    "timeouts",
)


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _MetricsServer6(_MetricsServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not written to stderr: the log is popauth's structlog events."""


class CountsByLabels:
    """A labelled counter for the hot paths: ``count(labels)`` adds one.

    Exposed as ``NAME_total`` (and ``NAME_created``) like a prometheus_client
    ``Counter`` of the same name and labels.
    """

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = list(labels)
        self._lock = threading.Lock()
        # label values -> [count, created]
        self._counts: dict[tuple[str, ...], list[float]] = {}

    def count(self, *labels: tuple[str, ...], amount: int = 1) -> None:
        """Add ``amount`` to the count of each of ``labels`` (label values, in order)."""
        with self._lock:
            for values in labels:
                entry = self._counts.get(values)
                if entry is None:
                    self._counts[values] = [amount, time.time()]
                else:
                    entry[0] += amount

    def totals(self) -> dict[tuple[str, ...], int]:
        """Every count so far, by its label values."""
        with self._lock:
            return {values: int(entry[0]) for values, entry in self._counts.items()}

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labels)
        with self._lock:
            counts = [(values, entry[0], entry[1]) for values, entry in self._counts.items()]
        for values, total, created in counts:
            family.add_metric(list(values), total, created=created)
        return family


class Latencies:
    """A histogram of seconds: ``NAME_bucket``, ``NAME_count``, ``NAME_sum``."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = buckets
        self._lock = threading.Lock()
        # One more bucket than bounds: +Inf.
        self._counts = [0] * (len(buckets) + 1)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(self._bounds, seconds)
        with self._lock:
            self._counts[index] += 1
            self._sum += seconds

    def family(self) -> HistogramMetricFamily:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip([*map(repr, self._bounds), "+Inf"], counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        family = HistogramMetricFamily(self._name, self._documentation)
        family.add_metric([], buckets, total)
        return family


class _HotCounts:
    """The collector of the hot-path counts (prometheus_client's collector protocol)."""

    def __init__(self, *sources: CountsByLabels | Latencies) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        for source in self._sources:
            yield source.family()


# The windows of popauth_pop_first_users, in days.
POP_FIRST_WINDOWS = (7, 30)


@dataclass(frozen=True, slots=True)
class CampaignGauges:
    """The phase-out's progress at one scrape, read from the usage ledger.

    ``pop_first_users``: days -> users who relayed by POP first within that
    many days; ``graduated``: None when the graduates could not be read
    (the gauge is left out of that scrape rather than shown as 0).
    """

    pop_first_users: dict[int, int]
    graduated: int | None
    exempt: int


class _CampaignCollector:
    """``popauth_pop_first_users{days}``, ``..._graduated_users``, ``..._exempt_users``."""

    def __init__(self, read: Callable[[], CampaignGauges]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        gauges = self._read()
        users = GaugeMetricFamily(
            "popauth_pop_first_users",
            "Users who relayed by POP first within the last DAYS days",
            labels=["days"],
        )
        for days, count in sorted(gauges.pop_first_users.items()):
            users.add_metric([str(days)], count)
        yield users
        if gauges.graduated is not None:
            yield GaugeMetricFamily(
                "popauth_pop_first_graduated_users",
                "Users graduated to SMTP AUTH (pop_first_graduate), not reinstated",
                value=gauges.graduated,
            )
        yield GaugeMetricFamily(
            "popauth_pop_first_exempt_users",
            "Users who keep POP first after its retirement (pop_first_exempt_users)",
            value=gauges.exempt,
        )

    def describe(self) -> Iterator[Metric]:
        # Nothing to read before the first scrape: registering must not call the ledger.
        return iter(())


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = CountsByLabels(
            "popauth_decisions", "Relay decisions by verdict and reason", ("verdict", "reason")
        )
        self.decision_seconds = Latencies(
            "popauth_decision_seconds",
            "Time to reach a relay decision, whitelist lookup included",
            _LATENCY_BUCKETS,
        )
        self.ingest_requests = CountsByLabels(
            "popauth_ingest_requests", "Ingest requests by verb and result", ("verb", "result")
        )
        self.socketmap_requests = CountsByLabels(
            "popauth_socketmap_requests",
            "Socketmap requests by outcome (requests counts them all)",
            ("result",),
        )
        self.registry.register(
            _HotCounts(
                self.decisions, self.decision_seconds, self.ingest_requests, self.socketmap_requests
            )
        )
        self.errors = Counter("popauth_errors", "Errors by kind", ["kind"], registry=self.registry)
        self.relay_budgets_spent = Counter(
            "popauth_relay_budgets_spent",
            "POP-first addresses that spent their relay budget, once per window",
            registry=self.registry,
        )
        # Notices to users still relaying by POP-first: sent, failed, dropped (queue full).
        self.notices = Counter(
            "popauth_pop_first_notices",
            "POP-first notices by result",
            ["result"],
            registry=self.registry,
        )
        self.whitelist_entries = Gauge(
            "popauth_whitelist_entries", "Clients on the whitelist", registry=self.registry
        )
        self._server: _MetricsServer | None = None

    def decision(self, verdict: str, reason: str, seconds: float | None = None) -> None:
        """Count one decision; ``seconds`` it took, where it is worth a sample."""
        self.decisions.count((verdict, reason))
        if seconds is not None:
            self.decision_seconds.observe(seconds)

    def relay_budget_spent(self) -> None:
        """Count one address whose relay budget ran out (its first refusal in a window)."""
        self.relay_budgets_spent.inc()

    def socketmap_request(self, result: str) -> None:
        """Count one socketmap outcome."""
        self.socketmap_requests.count((result,))

    def socketmap_answer(self, result: str) -> None:
        """Count one answered socketmap request and its outcome."""
        self.socketmap_requests.count(_REQUESTS, (result,))

    def socketmap_totals(self) -> dict[str, int]:
        """The socketmap's counts so far, one per result, zeros included."""
        totals = self.socketmap_requests.totals()
        return {result: totals.get((result,), 0) for result in SOCKETMAP_RESULTS}

    def ingest_request(self, verb: str, result: str, amount: int = 1) -> None:
        """Count ``amount`` ingest requests (one by default) by verb and result."""
        self.ingest_requests.count((verb, result), amount=amount)

    def track_whitelist_size(self, count: Callable[[], int]) -> None:
        """Ask the store for its size at every scrape."""
        self.whitelist_entries.set_function(count)

    def track_campaign(self, read: Callable[[], CampaignGauges]) -> None:
        """Read the phase-out's gauges from the usage ledger at every scrape."""
        self.registry.register(_CampaignCollector(read))

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
