"""The /metrics endpoint: served over HTTP, and really stopped by stop()."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from popauth.telemetry.metrics import Metrics


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text: str = response.read().decode()
        return text


@pytest.mark.parametrize(("host", "url_host"), [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")])
def test_scraped_then_stopped(host: str, url_host: str) -> None:
    metrics = Metrics()
    metrics.decision("accept", "whitelisted")
    metrics.track_whitelist_size(lambda: 7)
    metrics.serve(host, 0)
    port = metrics.port
    assert port is not None
    try:
        text = scrape(f"http://{url_host}:{port}/metrics")
    finally:
        metrics.stop()
    assert 'popauth_decisions_total{reason="whitelisted",verdict="accept"} 1.0' in text
    assert "popauth_whitelist_entries 7.0" in text
    assert metrics.port is None
    # Stopped means the port is closed, on every prometheus-client version.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe, pytest.raises(ConnectionRefusedError):
        probe.connect((host, port))


def test_stop_without_serve_does_nothing() -> None:
    metrics = Metrics()
    metrics.stop()
    assert metrics.port is None


def test_hot_path_counts_are_exposed_as_counters_and_a_histogram() -> None:
    metrics = Metrics()
    metrics.decision("reject", "relay_denied", 0.0003)
    metrics.decision("reject", "relay_denied")
    metrics.ingest_request("LOGIN", "ok")
    metrics.socketmap_answer("hits")

    def sample(name: str, **labels: str) -> float | None:
        value: float | None = metrics.registry.get_sample_value(name, labels)
        return value

    assert sample("popauth_decisions_total", verdict="reject", reason="relay_denied") == 2
    # Only the decisions that were timed are in the histogram.
    assert sample("popauth_decision_seconds_count") == 1
    assert sample("popauth_decision_seconds_bucket", le="0.00025") == 0
    assert sample("popauth_decision_seconds_bucket", le="0.0005") == 1
    assert sample("popauth_decision_seconds_bucket", le="+Inf") == 1
    assert sample("popauth_decision_seconds_sum") == 0.0003
    assert sample("popauth_ingest_requests_total", verb="LOGIN", result="ok") == 1
    assert sample("popauth_socketmap_requests_total", result="requests") == 1
    assert sample("popauth_socketmap_requests_total", result="hits") == 1
