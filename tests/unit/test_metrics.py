"""The /metrics endpoint: served over HTTP, and really stopped by stop()."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from popauth.metrics import Metrics


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
