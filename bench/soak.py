"""soak: minutes of SMTP sessions through a real Postfix while logins, revokes,
blocks and expiries churn; an oracle predicts every verdict.

The workers and the oracle are ``harness/soak.py`` (the live tests run the
same soak for seconds). Here it runs for ``FULL_SECONDS``, and popauth's
resident memory and open file descriptors are read at the start (after a
warm-up) and at the end. A wrong verdict fails the benchmark.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import BenchResult, Check, Mode
from harness.popauth import PopauthServer
from harness.ports import free_port
from harness.postfix import PostfixInstance
from harness.soak import LOCAL_DOMAIN, TTL, WORKERS, Oracle, Tally, run_workers, total

FULL_SECONDS = 300.0
QUICK_SECONDS = 8.0
WARMUP_SECONDS = 2.0


def process_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def process_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def run(mode: Mode, workdir: Path) -> BenchResult:
    seconds = QUICK_SECONDS if mode.quick else FULL_SECONDS
    result = BenchResult(
        "soak", f"soak: {seconds:.0f} s of SMTP sessions while logins, revokes, blocks expire"
    )
    (workdir / "popauth").mkdir(parents=True, exist_ok=True)
    server = PopauthServer(
        workdir / "popauth",
        trusted_networks=[],
        local_domains=[LOCAL_DOMAIN],
        local_mailers=["local"],
        log_format="console",
        log_level="warning",
        ttl=TTL,
        # The oracle judges logins, revokes and blocks; a relay budget would
        # tempfail a busy address it does not model.
        pop_first_max_recipients="",
    )
    postfix = PostfixInstance(
        root=workdir / "postfix",
        smtp_port=free_port(),
        milter=f"unix:{server.milter_path}",
        local_domain=LOCAL_DOMAIN,
    )
    tallies = [Tally() for _ in range(WORKERS)]
    warm = [Tally() for _ in range(WORKERS)]
    # One oracle per worker for the whole run: the warm-up's logins and
    # blocks are still in popauth when the measured part starts.
    oracles = [Oracle() for _ in range(WORKERS)]
    measured: dict[str, Any] = {}
    try:
        server.start()
        postfix.start()
        assert server.process is not None
        pid = server.process.pid
        # Warm-up: a short burst so that threads and caches exist before "start".
        run_workers(server, postfix.smtp_port, WARMUP_SECONDS, oracles, warm)
        measured["rss_start"] = process_rss_bytes(pid)
        measured["fds_start"] = process_fds(pid)
        began = time.monotonic()
        run_workers(server, postfix.smtp_port, seconds, oracles, tallies)
        elapsed = time.monotonic() - began
        measured["rss_end"] = process_rss_bytes(pid)
        measured["fds_end"] = process_fds(pid)
        if server.process.poll() is not None:
            raise RuntimeError("popauth died during the soak")
    finally:
        try:
            postfix.stop()
        finally:
            server.stop()
    summed, warm_summed = total(tallies), total(warm)
    if summed.wrong or warm_summed.wrong or not summed.judged:
        raise RuntimeError(
            f"soak: {summed.wrong + warm_summed.wrong} wrong verdict(s) in {summed.judged} "
            f"judged: {summed.wrong_examples + warm_summed.wrong_examples}"
        )
    result.metric("sessions", "sessions/s").samples.append(summed.sessions / elapsed)
    result.metric("sessions judged", "sessions").samples.append(summed.judged)
    result.metric("wrong verdicts", "verdicts").samples.append(summed.wrong)
    result.metric("RSS at start", "B").samples.append(measured["rss_start"])
    result.metric("RSS at end", "B").samples.append(measured["rss_end"])
    result.metric("open fds at start", "fds").samples.append(measured["fds_start"])
    result.metric("open fds at end", "fds").samples.append(measured["fds_end"])
    growth = measured["rss_end"] / measured["rss_start"]
    result.checks.append(Check("right verdicts share", 1 - summed.wrong / summed.judged, ">=", 1.0))
    result.checks.append(Check("RSS end/start", growth, "<=", 1.2))
    result.checks.append(
        Check("open fds end - start", measured["fds_end"] - measured["fds_start"], "<=", 2)
    )
    result.notes += [
        f"{summed.sessions} SMTP sessions ({summed.judged} judged by the oracle, "
        f"{summed.indeterminate} within an expiry window) in {elapsed:.0f} s, {WORKERS} workers",
        f"churn: {summed.logins} logins ({summed.refused_logins} refused as blocked), "
        f"{summed.revokes} revokes, {summed.blocks} blocks, {summed.unblocks} unblocks, "
        f"ttl {TTL} s",
        f"RSS {measured['rss_start'] / 2**20:.1f} MiB -> {measured['rss_end'] / 2**20:.1f} MiB; "
        f"open fds {measured['fds_start']} -> {measured['fds_end']}",
    ]
    return result
