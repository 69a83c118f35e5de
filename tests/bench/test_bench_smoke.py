"""The quick benchmark run completes, and every benchmark reports sane figures.

It checks that the harness works and that what it reports holds together,
not that popauth meets its targets: the targets are printed by ``make
bench``, never enforced here.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.registry import NAMES
from harness.leftovers import run_directory

REPO = Path(__file__).resolve().parents[2]
# The quick run takes about a minute; on a loaded machine, more.
TIMEOUT = 300
# Units whose figures are above zero in every round (CPU times measured in
# 10 ms ticks, counts such as wrong verdicts and descriptors may be zero).
POSITIVE_UNITS = {
    "decisions/s",
    "messages/s",
    "logins/s",
    "lookups/s",
    "grants/s",
    "renewals/s",
    "lines/s",
    "sessions/s",
    "ratio",
    "ms",
    "µs",
    "B",
    "B/entry",
}
# A side-by-side ratio outside this range is a broken measurement.
RATIO_BOUNDS = (0.001, 100.0)

# Runs private Postfix and Dovecot as root; without them it fails, never skips:
# the live layer's check stops the run with one line saying what to do.
pytestmark = pytest.mark.live


def run_quick_bench(output: Path) -> tuple[int, str]:
    """``python -m bench --quick``; stopped with SIGTERM (as Ctrl-C) if it overruns,
    so that it stops its daemons itself."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--json", str(output)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Its directory inside this run's, which the end-of-run check covers.
        env={**os.environ, "TMPDIR": str(run_directory())},
    )
    try:
        text, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            text, _ = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            text, _ = process.communicate()
        pytest.fail(f"the quick bench ran over {TIMEOUT} s and was stopped:\n{text[-4000:]}")
    return process.returncode, text


def check_metric(name: str, metric: dict[str, Any]) -> None:
    where = (name, metric["name"])
    values = [metric["min"], metric["median"], metric["max"], metric["p99"]]
    assert all(math.isfinite(value) for value in values), where
    if not metric.get("difference"):
        assert all(value >= 0 for value in values), where
    assert metric["min"] <= metric["median"] <= metric["max"], where
    assert metric["n"] >= 1, where
    if metric["samples"] is not None:
        assert len(metric["samples"]) == metric["n"], where
    if metric["unit"] in POSITIVE_UNITS:
        assert metric["min"] > 0, where
    if metric["unit"] == "ratio":
        low, high = RATIO_BOUNDS
        assert low <= metric["min"] and metric["max"] <= high, where


def section(output: str, name: str) -> str:
    """What the run printed for benchmark ``name``."""
    start = output.index(f"== {name}: ")
    end = output.find("\n== ", start + 1)
    return output[start : None if end < 0 else end]


def check_target(name: str, check: dict[str, Any], printed: str) -> None:
    where = (name, check["name"])
    assert math.isfinite(check["value"]) and math.isfinite(check["target"]), where
    assert check["op"] in (">=", "<="), where
    met = (
        check["value"] >= check["target"]
        if check["op"] == ">="
        else check["value"] <= check["target"]
    )
    assert check["met"] is met, where
    # Its line in the table of targets says the same (a metric may share its name).
    verdicts = [
        found.group(1)
        for line in printed.splitlines()
        if line.startswith(check["name"] + " ")
        and (found := re.search(r"\s(NOT met|met)\s+[-+]", line))
    ]
    assert verdicts == ["met" if met else "NOT met"], (where, verdicts)


def test_quick_bench_reports_every_benchmark(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    status, text = run_quick_bench(output)
    assert status == 0, text[-4000:]
    report = json.loads(output.read_text(encoding="utf-8"))
    assert report["mode"] == "quick"
    assert report["failures"] == {}
    assert report["leftovers"] == {}
    assert list(report["benchmarks"]) == list(NAMES)
    for name, bench in report["benchmarks"].items():
        assert f"== {name}: " in text, name
        assert bench["metrics"], f"{name} reports nothing"
        assert bench["checks"], f"{name} has no target"
        for metric in bench["metrics"].values():
            check_metric(name, metric)
        for check in bench["checks"]:
            check_target(name, check, section(text, name))
    load = report["machine"]
    assert len(load["load_average_at_start"]) == len(load["load_average_at_end"]) == 3
    # The soak's oracle judged sessions and found no wrong verdict.
    soak = report["benchmarks"]["soak"]["metrics"]
    assert soak["wrong verdicts"]["max"] == 0
    assert soak["sessions judged"]["min"] > 0
