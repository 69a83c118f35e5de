"""``python -m bench [--quick] [--json FILE] [--only B1,B3]``: the issue-5 benchmarks.

Prints one table per benchmark (median, min and max over the rounds; ratios
measured side by side in the same rounds; targets met or not) and writes
every number to the JSON file. Targets are reported, never enforced: the
exit status is 0 whenever every benchmark ran.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import follow, ingest, login_hook, milter_protocol, postfix_e2e, scale, sessions, soak
from bench.common import BenchResult, Mode, machine, render_result

Benchmark = Callable[[Mode, Path], BenchResult]

BENCHMARKS: dict[str, Benchmark] = {
    "B1": milter_protocol.run,
    "B2": postfix_e2e.run,
    "B3": login_hook.run,
    "B4": ingest.run,
    "B5": scale.run,
    "B6": sessions.run,
    "B7": follow.run,
    "B8": soak.run,
}


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short smoke run (under 60 s)")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        help="comma-separated benchmarks to run (default: all, %(default)s)",
    )
    arguments = parser.parse_args(argv)
    arguments.only = [key.strip().upper() for key in arguments.only.split(",") if key.strip()]
    unknown = [key for key in arguments.only if key not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    mode = Mode.of(arguments.quick)
    if os.geteuid() != 0:
        print("bench: needs root (private Postfix and Dovecot instances)", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "mode": "quick" if mode.quick else "full",
        "command": " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "rounds": mode.rounds,
        "seconds_per_run": mode.seconds,
        "benchmarks": {},
        "failures": {},
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
        for key in arguments.only:
            start = time.monotonic()
            try:
                result = BENCHMARKS[key](mode, workdir / key)
            except Exception as error:
                traceback.print_exc()
                report["failures"][key] = f"{type(error).__name__}: {error}"
                print(f"== {key}: FAILED: {error}\n", flush=True)
                continue
            result.seconds = time.monotonic() - start
            result.group_by_unit()
            report["benchmarks"][key] = result.to_json()
            print(render_result(result) + "\n", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["seconds"] = time.monotonic() - began
    print(f"total {report['seconds']:.0f} s")
    if arguments.json is not None:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {arguments.json}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
