"""Where popauth's CPU per milter session goes (``python -m bench.milter_profile``).

Not one of the timed benchmarks: a profile by instruction counts, which do
not depend on what else the machine is doing. Each set-up runs under
valgrind's callgrind; once it is ready its counters are zeroed, the harness
of B1 (:mod:`bench.milter_protocol`) drives a fixed number of sessions of the
B1 mix from one client, and the counters are dumped. The instructions per
session of popauth minus those of the no-op pymilter milter are popauth's
own work.

Set-ups, each one removing one more part of popauth's per-session work, so
that the differences between neighbours say what each part costs:

- ``popauth``: the product defaults (console log at ``info``);
- ``-log``: ``log_level = "warning"``, so no per-decision log line;
- ``-metrics``: and the Prometheus counters and histogram replaced by no-ops;
- ``-macros``: and no macro fetched from libmilter (values derived from the
  recipient, as the harness sends them);
- ``-store``: and the whitelist lookup answered from a dict;
- ``-gate``: and the gate (decision, ledger, mismatch check) replaced by a
  table of the same verdicts: what is left is the adapter and pymilter;
- ``no-op``: the no-op milter of B1.

The removals are made by this module's ``--launch`` mode, which patches the
named parts and then runs ``popauth serve``: bench code only, nothing in
popauth knows about it. Every set-up must still give B1's verdicts.

Instruction counts leave out the kernel (system calls: the log line's
write, thread creation, the GIL's futex waits); ``--cpu`` measures CPU time
without valgrind as well, side by side in rounds, for the same set-ups.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from bench.common import REPO, Stats, drive, format_number, process_cpu_seconds, render_table
from bench.milter_protocol import (
    EXPECTED_POPAUTH,
    LOCAL_DOMAIN,
    WHITELISTED_IPS,
    NoopMilterProcess,
    Tally,
    popauth_settings,
    scripts,
    session,
)

# Cumulative removals: each set-up removes its own part and every earlier one.
REMOVALS = ("log", "metrics", "macros", "store", "gate")
SETUPS = ("popauth", *(f"-{part}" for part in REMOVALS), "no-op")


def removals_of(setup: str) -> tuple[str, ...]:
    if not setup.startswith("-"):
        return ()
    return REMOVALS[: REMOVALS.index(setup[1:]) + 1]


# -- the launcher: popauth serve with parts removed ------------------------------


def _remove_metrics() -> None:
    from popauth.telemetry.metrics import Metrics

    Metrics.decision = lambda self, verdict, reason, seconds=None: None  # type: ignore[method-assign]


def _remove_macros() -> None:
    import Milter

    from popauth.doors.milter.adapter import RelayMilter, fail_closed
    from popauth.relay.recipients import Recipient

    @fail_closed
    def mail(self: RelayMilter, sender: str | None = None) -> int:
        decision, self._message = self._gate.message(self._address, "", sender)
        return int(Milter.ACCEPT) if decision is not None else int(Milter.CONTINUE)

    @fail_closed
    def envrcpt(self: RelayMilter, recipient: str, *parameters: str) -> int:
        message = self._message or self._gate.message_without_mail(self._address)
        address = recipient.strip("<>")
        mailer = "local" if address.endswith("@" + LOCAL_DOMAIN) else "smtp"
        rcpt = Recipient(envelope=recipient, mailer=mailer, resolved=address)
        return int(self._reply(self._gate.recipient(message, rcpt)))

    RelayMilter.mail = mail  # type: ignore[method-assign]
    RelayMilter.envrcpt = envrcpt  # type: ignore[method-assign]


def _remove_store() -> None:
    from popauth.store.memory import MemoryStore

    original = MemoryStore.lookup
    answers: dict[object, object] = {}

    def lookup(self: MemoryStore, address: Any) -> Any:
        key = int(address)
        answer = answers.get(key, answers)
        if answer is answers:
            answer = answers[key] = original(self, address)
        return answer

    MemoryStore.lookup = lookup  # type: ignore[method-assign]


def _remove_gate() -> None:
    from popauth.relay.decision import ACCEPT_LOCAL, ACCEPT_WHITELISTED, REJECT_RELAY, Client
    from popauth.relay.gate import Message, RelayGate

    whitelisted = set(WHITELISTED_IPS)

    def connection(self: RelayGate, address: Any) -> None:
        return None

    def message(
        self: RelayGate,
        address: Any,
        auth_user: str,
        sender: str | None = None,
        door: str = "milter",
    ) -> Any:
        decision = ACCEPT_WHITELISTED if str(address) in whitelisted else None
        return decision, Message(Client(address))

    def recipient(self: RelayGate, message: Message, recipient: Any) -> Any:
        return ACCEPT_LOCAL if recipient.mailer == "local" else REJECT_RELAY

    RelayGate.connection = connection  # type: ignore[method-assign]
    RelayGate.message = message  # type: ignore[method-assign]
    RelayGate.recipient = recipient  # type: ignore[method-assign]


_REMOVERS: dict[str, Callable[[], None]] = {
    "log": lambda: None,  # by configuration: log_level = "warning"
    "metrics": _remove_metrics,
    "macros": _remove_macros,
    "store": _remove_store,
    "gate": _remove_gate,
}


def launch(parts: list[str], argv: list[str]) -> int:
    """Remove ``parts`` and run the popauth command line ``argv`` (binary first)."""
    for part in parts:
        _REMOVERS[part]()
    from popauth.cli import main

    return main(argv[1:])


# -- the profile -----------------------------------------------------------------


def callgrind_command(out_file: Path) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out_file}",
        "--dump-line=no",
        "--compress-strings=no",
    ]


def _control(pid: int, option: str) -> None:
    subprocess.run(
        ["callgrind_control", option, str(pid)], check=True, capture_output=True, timeout=120
    )


def _total_instructions(out_file: Path) -> int:
    """The instructions of the newest dump (``summary:``/``totals:`` line)."""
    dumps = sorted(out_file.parent.glob(out_file.name + "*"), key=lambda p: p.stat().st_mtime)
    for line in dumps[-1].read_text(errors="replace").splitlines():
        match = re.match(r"(?:summary|totals): (\d+)", line)
        if match:
            return int(match.group(1))
    raise RuntimeError(f"no totals in {dumps[-1]}")


class Setup:
    """One milter process, possibly under callgrind."""

    def __init__(self, name: str, directory: Path, valgrind: bool) -> None:
        self.name = name
        self.directory = directory
        self.valgrind = valgrind
        self.out_file = directory / "callgrind.out"
        self._noop: NoopMilterProcess | None = None
        self._popauth: Any = None
        self.pid = 0
        self.path = ""

    def start(self) -> Setup:
        from harness.popauth import PopauthServer

        self.directory.mkdir(parents=True, exist_ok=True)
        wrapper = callgrind_command(self.out_file) if self.valgrind else []
        if self.name == "no-op":
            self._noop = NoopMilterProcess(self.directory, wrapper=wrapper).start(timeout=300)
            assert self._noop.process is not None
            self.pid, self.path = self._noop.process.pid, str(self._noop.milter_path)
            return self
        parts = list(removals_of(self.name))
        launcher = [sys.executable, "-m", "bench.milter_profile", "--launch", ",".join(parts)]
        settings = popauth_settings(
            self.directory, log_level="warning" if "log" in parts else "info"
        )
        server = PopauthServer(self.directory, wrapper=[*wrapper, *launcher], **settings)
        server.environment["PYTHONPATH"] = str(REPO)
        server.start(timeout=300)
        for index, ip in enumerate(WHITELISTED_IPS):
            reply = server.ask(f"LOGIN {ip} user{index:03d}")
            if not reply or not reply[0].startswith("OK"):
                raise RuntimeError(f"could not whitelist {ip}: {reply}")
        assert server.process is not None
        self._popauth = server
        self.pid, self.path = server.process.pid, str(server.milter_path)
        return self

    def stop(self) -> None:
        if self._noop is not None:
            self._noop.stop()
        if self._popauth is not None:
            self._popauth.stop(timeout=120)


def run_sessions(path: str, count: int, tally: Tally) -> None:
    plans = scripts()
    for index in range(count):
        session(path, plans[index % len(plans)], tally)


def check_verdicts(name: str, tally: Tally) -> None:
    if name == "no-op":
        return
    for (kind, reply), count in tally.replies.items():
        if reply != EXPECTED_POPAUTH[kind]:
            raise RuntimeError(f"{name}: {count} x {reply!r} for {kind} clients")


def instruction_profile(sessions: int, workdir: Path) -> dict[str, float]:
    """Instructions per session of every set-up, one after the other."""
    per_session: dict[str, float] = {}
    for name in SETUPS:
        setup = Setup(name, workdir / f"cg-{name}", valgrind=True).start()
        try:
            tally = Tally()
            run_sessions(setup.path, 50, tally)  # warm every path up
            _control(setup.pid, "-z")
            run_sessions(setup.path, sessions, tally)
            _control(setup.pid, "-d")
            per_session[name] = _total_instructions(setup.out_file) / sessions
            check_verdicts(name, tally)
        finally:
            setup.stop()
        print(f"  {name}: {per_session[name]:,.0f} instructions/session", flush=True)
    return per_session


def cpu_profile(seconds: float, rounds: int, workdir: Path) -> dict[str, list[float]]:
    """CPU microseconds per session, every set-up in turn in each round."""
    setups = {name: Setup(name, workdir / f"cpu-{name}", valgrind=False) for name in SETUPS}
    samples: dict[str, list[float]] = {name: [] for name in SETUPS}
    plans = scripts()
    try:
        for setup in setups.values():
            setup.start()
        for round_index in range(rounds):
            order = list(SETUPS[round_index % len(SETUPS) :] + SETUPS[: round_index % len(SETUPS)])
            for name in order:
                setup = setups[name]
                tally = Tally()

                def one(
                    worker: int, iteration: int, setup: Setup = setup, tally: Tally = tally
                ) -> None:
                    session(setup.path, plans[iteration % len(plans)], tally)

                before = process_cpu_seconds(setup.pid)
                outcome = drive(1, seconds, one, max_operations=200_000)
                cpu = process_cpu_seconds(setup.pid) - before
                if outcome.errors:
                    raise RuntimeError(f"{name}: {outcome.first_error}")
                check_verdicts(name, tally)
                samples[name].append(1e6 * cpu / max(1, outcome.operations))
    finally:
        for setup in setups.values():
            setup.stop()
    return samples


def report(instructions: dict[str, float], cpu: dict[str, list[float]]) -> str:
    rows = []
    names = list(SETUPS)
    for index, name in enumerate(names):
        row = [name]
        if instructions:
            row.append(format_number(instructions[name]))
            following = names[index + 1] if index + 1 < len(names) else None
            part = (
                ""
                if following is None
                else format_number(instructions[name] - instructions[following])
            )
            row.append(part)
        if cpu:
            row.append(format_number(Stats.of(cpu[name]).median))
        rows.append(row)
    headers = ["set-up"]
    if instructions:
        headers += ["instructions/session", "minus next set-up"]
    if cpu:
        headers.append("CPU us/session (median)")
    return render_table(headers, rows)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--launch"]:
        parts = [part for part in argv[1].split(",") if part]
        return launch(parts, argv[2:])
    parser = argparse.ArgumentParser(prog="python -m bench.milter_profile", description=__doc__)
    parser.add_argument("--sessions", type=int, default=2000, help="sessions counted per set-up")
    parser.add_argument("--no-valgrind", action="store_true", help="skip the instruction counts")
    parser.add_argument("--cpu", action="store_true", help="also measure CPU time per session")
    parser.add_argument("--cpu-rounds", type=int, default=5)
    parser.add_argument("--cpu-seconds", type=float, default=3.0)
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    arguments = parser.parse_args(argv)
    load = os.getloadavg()
    print(f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    began = time.monotonic()
    with TemporaryDirectory(prefix="popauth-profile-") as temporary:
        workdir = Path(temporary)
        workdir.chmod(0o755)
        instructions = (
            {} if arguments.no_valgrind else instruction_profile(arguments.sessions, workdir)
        )
        cpu = (
            cpu_profile(arguments.cpu_seconds, arguments.cpu_rounds, workdir)
            if arguments.cpu
            else {}
        )
    load = os.getloadavg()
    print(report(instructions, cpu))
    print(
        f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f};"
        f" {time.monotonic() - began:.0f} s"
    )
    if arguments.json is not None:
        arguments.json.write_text(
            json.dumps(
                {"instructions_per_session": instructions, "cpu_us_per_session": cpu}, indent=2
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
