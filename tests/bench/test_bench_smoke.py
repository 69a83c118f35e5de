"""The quick benchmark run completes and reports every benchmark with sane numbers.

It checks that the harness works, not that popauth meets its targets: the
targets are printed by ``make bench``, never enforced here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8")
RATE_UNITS = {
    "decisions/s",
    "messages/s",
    "logins/s",
    "lookups/s",
    "grants/s",
    "renewals/s",
    "lines/s",
    "sessions/s",
}

# Runs private Postfix and Dovecot as root; without them it fails, never skips.
pytestmark = pytest.mark.live


def test_quick_bench_reports_every_benchmark(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    report = json.loads(output.read_text(encoding="utf-8"))
    assert report["mode"] == "quick"
    assert report["failures"] == {}
    assert sorted(report["benchmarks"]) == list(BENCHMARKS)
    for key, bench in report["benchmarks"].items():
        metrics = bench["metrics"]
        assert metrics, key
        rates = [m for m in metrics.values() if m["unit"] in RATE_UNITS]
        assert rates or key == "B3", f"{key} reports no rate"
        for metric in metrics.values():
            for field in ("median", "min", "max"):
                value = metric[field]
                assert math.isfinite(value), (key, metric["name"], field)
            assert metric["min"] <= metric["median"] <= metric["max"], (key, metric["name"])
            if metric["unit"] in RATE_UNITS | {"ratio", "ms", "B"}:
                assert metric["min"] > 0, (key, metric["name"])
        for check in bench["checks"]:
            assert isinstance(check["met"], bool)  # reported, not enforced
            assert math.isfinite(check["value"])
    # The table is printed for every benchmark.
    for key in BENCHMARKS:
        assert f"== {key}:" in completed.stdout
