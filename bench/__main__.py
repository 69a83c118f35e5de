"""``python -m bench [--quick] [--json FILE] [--only NAME,...]``: popauth's benchmarks.

Prints one table per benchmark (median, min and max over the rounds; ratios
measured side by side in the same rounds; targets met or not) and writes
every number to the JSON file, from which ``python -m bench.report`` makes
the table of docs/performance.rst. Targets are reported, never enforced.

Every daemon a benchmark starts lives in its directory of the run; one
still running when the benchmark has ended is stopped and named, and the
run fails (exit status 1), as it does when a benchmark fails. SIGTERM
stops the run the way Ctrl-C does: each benchmark stops its daemons.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from bench.common import Mode, machine, render_result
from bench.registry import BENCHMARKS, NAMES, Benchmark, find
from harness.leftovers import stop_leftovers


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        epilog="benchmarks (old key):\n"
        + "\n".join(f"  {b.name} ({b.old_key}): {b.measures}" for b in BENCHMARKS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run (about a minute)")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument(
        "--only",
        default=",".join(NAMES),
        help="comma-separated benchmarks to run, by name or old key (default: all)",
    )
    arguments = parser.parse_args(argv)
    chosen: list[Benchmark] = []
    unknown = []
    for key in (key.strip() for key in arguments.only.split(",")):
        if not key:
            continue
        benchmark = find(key)
        if benchmark is None:
            unknown.append(key)
        elif benchmark not in chosen:
            chosen.append(benchmark)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; use {', '.join(NAMES)}")
    arguments.only = chosen
    return arguments


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # As Ctrl-C: every benchmark's finally stops its daemons on the way out.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    mode = Mode.of(arguments.quick)
    if os.geteuid() != 0:
        print("bench: needs root (private Postfix and Dovecot instances)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    report: dict[str, Any] = {
        "mode": "quick" if mode.quick else "full",
        "command": " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "rounds": mode.rounds,
        "seconds_per_run": mode.seconds,
        "benchmarks": {},
        "failures": {},
        "leftovers": {},
    }
    info = report["machine"]
    print(
        f"popauth benchmarks ({report['mode']}): {info['nproc']} CPU(s), {info['cpu_model']}, "
        f"load {info['load_average_at_start'][0]:.2f}; {mode.rounds} rounds of "
        f"{mode.seconds} s per set-up\npopauth {info['popauth_revision']} from "
        f"{info['popauth_imported_from']}\n",
        flush=True,
    )
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="popauth-bench-"))
    workdir.chmod(0o755)  # Postfix and Dovecot users walk into it
    try:
        for benchmark in arguments.only:
            run_one(benchmark, mode, workdir, report)
    except KeyboardInterrupt as interruption:
        report["failures"]["interrupted"] = str(interruption) or "Ctrl-C"
        print(f"== interrupted ({report['failures']['interrupted']})", file=sys.stderr)
    finally:
        # Whatever happened (a failure, Ctrl-C, SIGTERM): nothing may outlive the run.
        note_leftovers(report, "run", stop_leftovers([workdir]))
        shutil.rmtree(workdir, ignore_errors=True)
        report["seconds"] = time.monotonic() - began
        report["machine"]["load_average_at_end"] = list(os.getloadavg())
        if arguments.json is not None:
            arguments.json.parent.mkdir(parents=True, exist_ok=True)
            arguments.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    end_load = report["machine"]["load_average_at_end"]
    print(f"total {report['seconds']:.0f} s; load at the end {end_load[0]:.2f}")
    if arguments.json is not None:
        print(f"results written to {arguments.json}")
    if "interrupted" in report["failures"]:
        return 130
    return 1 if report["failures"] or report["leftovers"] else 0


def run_one(benchmark: Benchmark, mode: Mode, workdir: Path, report: dict[str, Any]) -> None:
    """Run one benchmark in its own directory; record its result or its failure."""
    # The short old key: UNIX socket paths deep inside (Dovecot's, Postfix's)
    # must stay within 107 bytes wherever the run's directory is.
    directory = workdir / benchmark.old_key
    start = time.monotonic()
    try:
        result = benchmark.run(mode, directory)
    except Exception as error:
        traceback.print_exc()
        report["failures"][benchmark.name] = f"{type(error).__name__}: {error}"
        print(f"== {benchmark.name}: FAILED: {error}\n", flush=True)
    else:
        result.key = benchmark.name
        result.seconds = time.monotonic() - start
        result.group_by_unit()
        report["benchmarks"][benchmark.name] = result.to_json()
        print(render_result(result) + "\n", flush=True)
    finally:
        note_leftovers(report, benchmark.name, stop_leftovers([directory]))


def note_leftovers(report: dict[str, Any], owner: str, leftovers: list[Any]) -> None:
    if not leftovers:
        return
    described = [leftover.describe() for leftover in leftovers]
    report["leftovers"][owner] = described
    print(
        f"== {owner}: left daemons running (now stopped):\n  " + "\n  ".join(described) + "\n",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
