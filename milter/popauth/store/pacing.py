"""Long jobs that share the interpreter with the relay decision let it in often.

A snapshot, a listing or a revocation of a user walks the whole whitelist.
Done in one go it would hold the store's lock, or the interpreter's, for
as long as that takes: the RCPT decisions and logins of every other thread
would wait behind it. Such a job works in chunks of :data:`CHUNK` items and
calls :func:`let_others_run` between them. A thread waiting for the
interpreter lock is woken when it is released and takes it while this one
sleeps; ``time.sleep(0)`` would not do, as the sleeper often takes the lock
back before the woken thread runs, and the waiter would then wait for the
interpreter's switch interval (:data:`SWITCH_INTERVAL`).
"""

from __future__ import annotations

import time

# Items per chunk: some tens of microseconds of work. Measured at 3*10^5
# entries with snapshots written back to back (bench/snapshot_latency.py):
# chunks of 64 kept the decisions' p99 under 1 ms, chunks of 256 let it
# reach about 2 ms; the price is a longer snapshot (pauses, not CPU).
CHUNK = 64
# Long enough for a woken thread to be scheduled; a whole listing of 10^6
# entries pauses about 30,000 times (walk, grants, encoding), for a few
# seconds in all, during which the job uses no CPU.
PAUSE = 0.0001


# The interpreter's switch interval for popauth serve (Python's default is
# 5 ms): the longest a thread that wants the interpreter lock waits for one
# that keeps running Python, e.g. a decision behind a snapshot. Decisions
# are far shorter than this, so it costs nothing when nothing long runs.
SWITCH_INTERVAL = 0.0005


def let_others_run() -> None:
    """Release the interpreter for a moment, so that waiting threads go first."""
    time.sleep(PAUSE)
