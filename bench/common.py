"""Shared pieces of the benchmarks: run modes, statistics, results, tables.

Every benchmark measures its set-ups *side by side*: each round runs every
set-up once, in turn, so that load from other users of the machine hits all
of them alike. Ratios are computed per round (numerator and denominator from
the same round) and then summarised by their median.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
POPAUTH_BIN = VENV_BIN / "popauth"


@dataclass(frozen=True)
class Mode:
    """How long and how often each benchmark measures."""

    quick: bool
    rounds: int
    seconds: float  # duration of one timed run of one set-up
    warmup: float  # untimed run of each set-up before the rounds

    @classmethod
    def of(cls, quick: bool) -> Mode:
        if quick:
            return cls(quick=True, rounds=2, seconds=0.6, warmup=0.2)
        return cls(quick=False, rounds=5, seconds=3.0, warmup=0.5)


# -- statistics ----------------------------------------------------------------


def own_senders_file(directory: Path, logins: int, sender: str) -> Path:
    """A ``pop_first_sender_addresses`` file that makes ``sender`` the own
    address of every ``userNNN`` the benchmarks log in: users send as
    themselves, so the default ``pop_first_sender = "warn"`` logs nothing."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sender-addresses"
    path.write_text("".join(f"user{n:03d}: {sender}\n" for n in range(logins)), encoding="ascii")
    return path


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1) of non-empty ``values``."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Stats:
    median: float
    minimum: float
    maximum: float
    p99: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            raise ValueError("no samples")
        return cls(
            median=statistics.median(values),
            minimum=min(values),
            maximum=max(values),
            p99=percentile(values, 0.99),
            count=len(values),
        )


# -- results -------------------------------------------------------------------


@dataclass
class Metric:
    """One measured quantity: its samples (one per round, or one per event)."""

    name: str
    unit: str
    samples: list[float] = field(default_factory=list)
    show_p99: bool = False
    # A difference of two measurements (e.g. CPU beyond a baseline's): on a
    # noisy machine a round may measure it below zero.
    difference: bool = False

    def stats(self) -> Stats:
        return Stats.of(self.samples)

    def to_json(self) -> dict[str, Any]:
        summary = self.stats()
        return {
            "name": self.name,
            "unit": self.unit,
            "median": summary.median,
            "min": summary.minimum,
            "max": summary.maximum,
            "p99": summary.p99,
            "n": summary.count,
            "samples": self.samples if len(self.samples) <= 50 else None,
            "difference": self.difference,
        }


Op = Literal[">=", "<="]


@dataclass(frozen=True)
class Check:
    """A target: ``value op target``. Reported, never enforced."""

    name: str
    value: float
    op: Op
    target: float
    unit: str = ""

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.op == ">=" else self.value <= self.target

    @property
    def margin(self) -> float:
        """How far from the target, relative to it: positive means met by that much."""
        if self.target == 0:
            return math.inf if self.met else -math.inf
        relative = (self.value - self.target) / abs(self.target)
        return relative if self.op == ">=" else -relative

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "op": self.op,
            "target": self.target,
            "unit": self.unit,
            "met": self.met,
            "margin": self.margin,
        }


@dataclass
class BenchResult:
    key: str  # its name, e.g. "milter-throughput" (the runner sets it)
    title: str
    metrics: list[Metric] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def metric(self, name: str, unit: str, *, show_p99: bool = False) -> Metric:
        for existing in self.metrics:
            if existing.name == name:
                return existing
        created = Metric(name, unit, show_p99=show_p99)
        self.metrics.append(created)
        return created

    def ratio(self, name: str, numerator: str, denominator: str) -> Metric:
        """Per-round ratios of two metrics measured in the same rounds."""
        top = self.metric(numerator, "").samples
        bottom = self.metric(denominator, "").samples
        ratio = self.metric(name, "ratio")
        ratio.samples = [a / b for a, b in zip(top, bottom, strict=True) if b > 0]
        return ratio

    def group_by_unit(self) -> None:
        """Order the metrics by unit (in order of first appearance), ratios last."""
        units: list[str] = []
        for metric in self.metrics:
            if metric.unit not in units and metric.unit != "ratio":
                units.append(metric.unit)
        units.append("ratio")
        self.metrics.sort(key=lambda metric: units.index(metric.unit))

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "seconds": self.seconds,
            "metrics": {metric.name: metric.to_json() for metric in self.metrics},
            "checks": [check.to_json() for check in self.checks],
            "notes": self.notes,
        }


def rounds(mode: Mode, setups: Sequence[str], run: Callable[[str, float], None]) -> None:
    """Warm every set-up up, then run them in turn, ``mode.rounds`` times.

    The order rotates from round to round so that no set-up always runs
    first (right after the warm-up) or last.
    """
    for setup in setups:
        run(setup, -mode.warmup)  # a negative duration: warm-up, not recorded
    for index in range(mode.rounds):
        shift = index % len(setups)
        for setup in [*setups[shift:], *setups[:shift]]:
            run(setup, mode.seconds)


# -- presentation --------------------------------------------------------------


def format_number(value: float) -> str:
    if math.isinf(value) or math.isnan(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(header) for header in headers]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        parts = [first.ljust(widths[0])]
        parts += [cell.rjust(width) for cell, width in zip(rest, widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def render_result(result: BenchResult) -> str:
    show_p99 = any(metric.show_p99 for metric in result.metrics)
    headers = ["metric", "unit", "median", "min", "max"]
    if show_p99:
        headers.append("p99")
    headers.append("n")
    rows = []
    for metric in result.metrics:
        if not metric.samples:
            continue
        summary = metric.stats()
        row = [
            metric.name,
            metric.unit,
            format_number(summary.median),
            format_number(summary.minimum),
            format_number(summary.maximum),
        ]
        if show_p99:
            row.append(format_number(summary.p99) if metric.show_p99 else "")
        row.append(str(summary.count))
        rows.append(row)
    parts = [
        f"== {result.key}: {result.title} ({result.seconds:.0f} s)",
        render_table(headers, rows),
    ]
    if result.checks:
        check_rows = [
            [
                check.name,
                format_number(check.value),
                f"{check.op} {format_number(check.target)}",
                "met" if check.met else "NOT met",
                f"{check.margin:+.0%}",
            ]
            for check in result.checks
        ]
        parts += ["", render_table(["target", "measured", "target", "", "margin"], check_rows)]
    parts += [f"  * {note}" for note in result.notes]
    return "\n".join(parts)


def _git(*arguments: str) -> str:
    import subprocess

    completed = subprocess.run(
        ["git", "-C", str(REPO), *arguments], capture_output=True, text=True, check=False
    )
    return completed.stdout.strip() or "unknown"


def _popauth_location() -> str:
    """Where ``popauth serve`` will import the package from (PYTHONPATH may override)."""
    import importlib.util

    spec = importlib.util.find_spec("popauth")
    return str(Path(spec.origin).parent) if spec and spec.origin else "unknown"


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in (
            Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").splitlines()
        ):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "popauth_revision": _git("describe", "--always", "--dirty"),
        "popauth_imported_from": _popauth_location(),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
    }


class Deadline:
    """A monotonic deadline."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def passed(self) -> bool:
        return time.monotonic() >= self.at

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())


@dataclass
class DriveOutcome:
    operations: int
    elapsed: float
    errors: int
    first_error: str | None

    @property
    def rate(self) -> float:
        return self.operations / self.elapsed if self.elapsed > 0 else 0.0


def drive(
    workers: int,
    seconds: float,
    operation: Callable[[int, int], None],
    *,
    max_operations: int = 1_000_000,
) -> DriveOutcome:
    """Run ``operation(worker, iteration)`` in ``workers`` threads until time is up.

    Bounded both ways: each worker stops at the deadline or after its share
    of ``max_operations``. An operation that raises counts as an error (the
    first one is kept for the report) and does not count as done.
    """
    import threading

    share = max(1, max_operations // workers)
    counts = [0] * workers
    errors = [0] * workers
    first_error: list[str] = []
    start = threading.Barrier(workers + 1)

    def work(worker: int) -> None:
        start.wait()
        iteration = 0
        while iteration < share and not deadline.passed():
            try:
                operation(worker, iteration)
                counts[worker] += 1
            except Exception as error:
                errors[worker] += 1
                if not first_error:
                    first_error.append(f"{type(error).__name__}: {error}")
                if errors[worker] > 100:
                    return
            iteration += 1

    threads = [
        threading.Thread(target=work, args=(index,), daemon=True) for index in range(workers)
    ]
    for thread in threads:
        thread.start()
    deadline = Deadline(seconds)  # read by the workers once the barrier opens
    began = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join(seconds + 60)
    elapsed = time.perf_counter() - began
    return DriveOutcome(sum(counts), elapsed, sum(errors), first_error[0] if first_error else None)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (all its threads) so far."""
    text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
