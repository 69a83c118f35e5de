"""The MTA tool runner: output kept or streamed, errors named, cancel from another thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from popauth.localdelivery.commands import CommandFailed, CommandRunner, CommandUnavailable


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie that nobody reaped yet (its parent was killed)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_run_keeps_output_and_status() -> None:
    result = CommandRunner().run(["sh", "-c", "cat; echo oops >&2; exit 3"], "in\n")
    assert (result.returncode, result.stdout, result.stderr) == (3, "in\n", "oops\n")
    assert result.error_text() == "oops"


def test_lines_are_streamed_and_a_failure_comes_after_them() -> None:
    runner = CommandRunner()
    script = "for i in 1 2 3; do echo line$i; done; printf tail; echo bad >&2; exit 1"
    seen: list[str] = []
    with pytest.raises(CommandFailed) as raised:
        for line in runner.lines(["sh", "-c", script]):
            seen.append(line)
    assert seen == ["line1", "line2", "line3", "tail"]
    assert raised.value.result.error_text() == "bad"
    assert list(runner.lines(["printf", "a\\nb\\n"])) == ["a", "b"]


def test_missing_tools_are_named() -> None:
    with pytest.raises(CommandUnavailable, match="/nowhere/postconf: not found"):
        CommandRunner().run(["/nowhere/postconf"])


def test_a_silent_listing_times_out() -> None:
    runner = CommandRunner(timeout=0.2)
    with pytest.raises(CommandUnavailable, match="printed nothing for"):
        list(runner.lines(["sleep", "30"]))
    with pytest.raises(CommandUnavailable, match="did not finish within"):
        runner.run(["sleep", "30"])


@pytest.mark.parametrize("streamed", [False, True])
def test_cancel_kills_the_tool_and_everything_it_started(tmp_path: Path, streamed: bool) -> None:
    runner = CommandRunner()
    started = tmp_path / "pid"
    # A shell that starts a child, as a wrapper script around postconf might.
    script = f"sleep 300 & echo $! > {started}; wait"
    failure: list[BaseException] = []

    def hang() -> None:
        try:
            if streamed:
                list(runner.lines(["sh", "-c", script]))
            else:
                runner.run(["sh", "-c", script])
        except BaseException as problem:
            failure.append(problem)

    worker = threading.Thread(target=hang)
    worker.start()
    while not (started.exists() and started.read_text().strip()):
        worker.join(0.01)
    child = int(started.read_text())
    runner.cancel()
    worker.join(30)
    assert not worker.is_alive()
    assert isinstance(failure[0], CommandUnavailable), failure
    assert "popauth is stopping" in str(failure[0])
    deadline = time.monotonic() + 10  # SIGKILL is delivered, not awaited
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gone(child)
    with pytest.raises(CommandUnavailable, match="not run, popauth is stopping"):
        runner.run(["true"])
